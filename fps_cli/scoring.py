"""Scorers: one score per candidate weight entry, as a ``[rows, cols]`` matrix (rows = output neurons).

A conv weight ``[out, in/groups, *kernel]`` is ``out`` rows of ``in/groups * prod(kernel)`` inputs; its row-major
flattening is the weight's own, so flat indices into the matrix are flat indices into the parameter.

Every method shares the same candidates, budget and selection code; only the score differs
(DESIGN.md section 2):

- ``fps``: ``|W[i, j]| * a[j]``, ``a`` the mean ``|x_j|`` (``l1``) or its root mean square (``l2``).
- ``weight``: ``|W[i, j]|``.
- ``activation``: ``a[j]`` broadcast over rows.
- ``random``: seeded uniform scores.
- ``gps``: ``|g[i, j]|``, the gradient of the GPS loss summed over one pass of the data (:mod:`.gradients`).

With an *anchor* (experimental), the statistic ``a`` of ``fps`` and ``activation`` becomes its growth relative to
the same statistic measured on other data: ``a_task[j] / (a_anchor[j] + eps)``.

:func:`make_scores` is the one entry point: every method, fresh or re-selected from a score file, goes through it
and then through the same :func:`~fps_cli.selector.build_mask`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Protocol

import torch
from torch import Tensor, nn

from .activations import InputStats
from .constants import ACTIVATION_METHODS, METHODS

ANCHOR_EPS = 1e-6


def row_shapes(modules: Mapping[str, nn.Module]) -> dict[str, tuple[int, int]]:
    """``name -> (rows, fan_in)`` of each candidate layer's weight."""
    return {name: (m.weight.shape[0], m.weight[0].numel()) for name, m in modules.items()}


def as_rows(weight: Tensor) -> Tensor:
    """View a Linear / Conv weight as ``[out, fan_in]``."""
    return weight.reshape(weight.shape[0], -1)


def row_statistic(
    module: nn.Module, stats: InputStats, norm: str, anchor: InputStats | None = None, eps: float = ANCHOR_EPS
) -> Tensor:
    """The per-input statistic laid out like the weight's rows: ``[groups, 1, fan_in]`` for broadcasting.

    For a grouped conv, output neurons of group ``g`` see only the input channels of group ``g``.

    Args:
        module: the layer.
        stats: its input statistics on the task's data.
        norm: ``l1`` or ``l2``.
        anchor: the same layer's statistics on anchor data; when given, the statistic is the growth
            ``a_task / (a_anchor + eps)``.
        eps: keeps the growth finite where the anchor statistic is zero.
    """
    a = stats.statistic(norm).float()  # [in] or [in, *kernel]
    if anchor is not None:
        a = a / (anchor.statistic(norm).float().to(a.device) + eps)
    groups = getattr(module, "groups", 1)
    return a.reshape(groups, 1, -1)


def fps_scores(
    module: nn.Module, weight: Tensor, stats: InputStats, norm: str, anchor: InputStats | None = None
) -> Tensor:
    """FPS scores ``|W| * a`` of one layer, ``[rows, fan_in]`` fp32 (``a`` anchored when ``anchor`` is given)."""
    a = row_statistic(module, stats, norm, anchor)  # [groups, 1, fan_in]
    w = as_rows(weight).detach().float().abs()
    return (w.reshape(a.shape[0], -1, a.shape[-1]) * a).reshape(w.shape)


def activation_scores(
    module: nn.Module, weight: Tensor, stats: InputStats, norm: str, anchor: InputStats | None = None
) -> Tensor:
    """Activation-only scores ``a[j]`` broadcast over the rows, ``[rows, fan_in]`` fp32."""
    a = row_statistic(module, stats, norm, anchor)
    rows = as_rows(weight)
    return a.expand(a.shape[0], rows.shape[0] // a.shape[0], a.shape[-1]).reshape(rows.shape).to(rows.device)


def weight_scores(weight: Tensor) -> Tensor:
    """Magnitude scores ``|W|``, ``[rows, fan_in]`` fp32."""
    return as_rows(weight).detach().float().abs()


def random_scores(weight: Tensor, seed: int, index: int) -> Tensor:
    """Seeded uniform scores; the same for a given (seed, layer index) on every device and every call."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    return torch.rand(as_rows(weight).shape, generator=generator).to(weight.device)


def gradient_scores(gradient: Tensor) -> Tensor:
    """GPS scores ``|g|`` of one layer's summed gradient, ``[rows, fan_in]`` fp32."""
    return as_rows(gradient).detach().float().abs()


class ScoreSource(Protocol):
    """What selection needs: candidate names in model order and each one's score matrix on demand."""

    def __iter__(self) -> Iterator[str]: ...

    def __len__(self) -> int: ...

    def __getitem__(self, name: str) -> Tensor: ...


class ActivationScores(Mapping[str, Tensor]):
    """Lazily computed scores of an activation-based method; scores are made one layer at a time.

    Args:
        method: one of :data:`ACTIVATION_METHODS`.
        modules: candidate weight name -> layer, in model order.
        stats: candidate weight name -> input statistics (unused by ``weight`` and ``random``).
        norm: ``l1`` or ``l2``.
        seed: seed of the ``random`` method.
        anchor: candidate weight name -> input statistics on anchor data (``fps`` and ``activation`` only).
    """

    def __init__(
        self,
        method: str,
        modules: Mapping[str, nn.Module],
        stats: Mapping[str, InputStats] | None,
        norm: str = "l1",
        seed: int = 0,
        anchor: Mapping[str, InputStats] | None = None,
    ) -> None:
        if method not in ACTIVATION_METHODS:
            raise ValueError(f"unknown method {method!r}; expected one of {ACTIVATION_METHODS}")
        if method in ("fps", "activation") and stats is None:
            raise ValueError(f"method {method!r} needs activation statistics")
        if anchor is not None and method not in ("fps", "activation"):
            raise ValueError(f"an anchor scales the activation statistic; method {method!r} has none")
        self.method, self.modules, self.stats, self.norm, self.seed = method, modules, stats, norm, seed
        self.anchor = anchor
        self._index = {name: i for i, name in enumerate(modules)}

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each layer's ``[rows, fan_in]`` score shape, without computing a score."""
        return row_shapes(self.modules)

    def __getitem__(self, name: str) -> Tensor:
        module = self.modules[name]
        weight = module.weight
        anchor = self.anchor[name] if self.anchor is not None else None
        if self.method == "fps":
            return fps_scores(module, weight, self.stats[name], self.norm, anchor)
        if self.method == "activation":
            return activation_scores(module, weight, self.stats[name], self.norm, anchor)
        if self.method == "weight":
            return weight_scores(weight)
        return random_scores(weight, self.seed, self._index[name])


class GradientScores(Mapping[str, Tensor]):
    """GPS scores ``|g|`` of summed gradients, made one layer at a time.

    Args:
        modules: candidate weight name -> layer, in model order (the order selection walks).
        gradients: candidate weight name -> summed gradient, shaped like the weight.
    """

    def __init__(self, modules: Mapping[str, nn.Module], gradients: Mapping[str, Tensor]) -> None:
        missing = [name for name in modules if name not in gradients]
        if missing:
            raise ValueError(f"no gradients for {', '.join(missing)}")
        self.modules, self.gradients = modules, gradients

    def __iter__(self) -> Iterator[str]:
        return iter(self.modules)

    def __len__(self) -> int:
        return len(self.modules)

    def __getitem__(self, name: str) -> Tensor:
        return gradient_scores(self.gradients[name])

    @property
    def shapes(self) -> dict[str, tuple[int, int]]:
        """Each layer's ``[rows, fan_in]`` score shape, without computing a score."""
        return row_shapes(self.modules)


def make_scores(
    method: str,
    modules: Mapping[str, nn.Module],
    *,
    stats: Mapping[str, InputStats] | None = None,
    gradients: Mapping[str, Tensor] | None = None,
    norm: str = "l1",
    seed: int = 0,
    anchor: Mapping[str, InputStats] | None = None,
) -> Mapping[str, Tensor]:
    """The scores of any method, as a lazy mapping name -> ``[rows, fan_in]`` in model order.

    Args:
        method: one of :data:`~fps_cli.constants.METHODS`.
        modules: candidate weight name -> layer, in model order.
        stats: input statistics (``fps``, ``activation``).
        gradients: summed gradients (``gps``).
        norm: ``l1`` or ``l2`` (activation-based methods).
        seed: seed of the ``random`` method.
        anchor: anchor statistics (``fps``, ``activation``; experimental).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    if method == "gps":
        if gradients is None:
            raise ValueError("method 'gps' needs summed gradients")
        if anchor is not None:
            raise ValueError("an anchor scales the activation statistic; method 'gps' has none")
        return GradientScores(modules, gradients)
    return ActivationScores(method, modules, stats, norm, seed, anchor)
