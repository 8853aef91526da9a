"""Where the sparse fine-tuning mechanism lives: a frozen base plus a trainable 1-D delta per masked tensor.

For every partially trained parameter ``W`` (a mask entry), :func:`attach` registers a
:mod:`torch.nn.utils.parametrize` parametrization on its module, so that every access to ``module.weight``
computes ``W = W_base + scatter(delta)`` where ``W_base`` is the frozen original (``requires_grad=False``) and
``delta`` is a 1-D ``nn.Parameter`` of the values at the mask's flat indices, zero at first. The module's own
``forward`` is untouched, so module forward hooks keep working. The head and the fully trainable tensors stay
ordinary parameters with ``requires_grad=True``; everything else is frozen.

Only the deltas and the fully trainable tensors require gradients, so an optimizer built over
:meth:`SparseParams.parameters` holds state for exactly the trainable elements, weight decay can never reach a
frozen weight, and no dense gradient of a masked weight is kept between steps (the dense gradient of the
effective weight exists only transiently inside the layer's backward, as for any layer).

One more copy is avoidable: a layer saves its effective weight for the backward pass, which would keep one
dense copy of every masked weight alive from forward to backward. Inside :func:`recompute_sparse_weights` the
effective weights are not saved but recomputed from base and delta when the backward needs them.

Attaching changes the parameter names of the masked modules (``blocks.0.attn.qkv.parametrizations.weight.
original`` instead of ``blocks.0.attn.qkv.weight``); :class:`SparseParams` keeps everything keyed by the
original names, and :func:`detach` restores the model exactly.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize


class SparseAdd(nn.Module):
    """Parametrization ``W_base -> W_base + scatter(delta)`` over fixed flat indices.

    Attributes:
        index: sorted flat (row-major) indices of the trainable entries, int64 buffer.
        delta: the change at those entries, a 1-D fp32 parameter.
    """

    def __init__(self, index: Tensor, values: Tensor | None = None) -> None:
        super().__init__()
        index = index.reshape(-1).long()
        self.register_buffer("index", index)
        init = torch.zeros(index.numel(), dtype=torch.float32) if values is None else values.detach().float().clone()
        self.delta = nn.Parameter(init.to(index.device))

    def forward(self, base: Tensor) -> Tensor:
        weight = base.reshape(-1).index_add(0, self.index, self.delta.to(base.dtype)).view_as(base)
        _register_effective(weight, self, base)
        return weight

    def recompute(self, base: Tensor) -> Tensor:
        with torch.no_grad():
            return base.reshape(-1).index_add(0, self.index, self.delta.to(base.dtype)).view_as(base)


@dataclass
class SparseParams:
    """The trainable parameters of a model with deltas attached, keyed by the model's original names.

    Attributes:
        deltas: partially trained parameter name -> its parametrization (``.index``, ``.delta``).
        full: fully trained parameter name -> the parameter itself.
    """

    deltas: dict[str, SparseAdd]
    full: dict[str, nn.Parameter]

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every trainable parameter: ``<name>::values`` for a delta, ``<name>`` for a fully trained tensor."""
        for name, p in self.deltas.items():
            yield f"{name}::values", p.delta
        yield from self.full.items()

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    @property
    def numel(self) -> int:
        """Trainable elements (selected entries + fully trained tensors)."""
        return sum(p.numel() for p in self.parameters())


def _split(name: str) -> tuple[str, str]:
    module, _, attr = name.rpartition(".")
    return module, attr


def attach(
    model: nn.Module,
    indices: Mapping[str, Tensor],
    fully_trainable: list[str],
    values: Mapping[str, Tensor] | None = None,
) -> SparseParams:
    """Freeze ``model`` and make only the given entries and tensors trainable.

    Args:
        model: a model whose parameter names are those of the mask (nothing attached yet). Move it to its device
            first: the deltas are created where the base weights are.
        indices: partially trained parameter name -> sorted flat indices of its trainable entries.
        fully_trainable: parameters trained in full (head, biases).
        values: optional starting deltas (``<name>`` -> 1-D values), e.g. from a delta file; default zeros.

    Returns:
        The trainable parameters, keyed by the original names.
    """
    params = dict(model.named_parameters())
    unknown = [n for n in [*indices, *fully_trainable] if n not in params]
    if unknown:
        raise KeyError(f"not parameters of the model: {', '.join(unknown)}")
    for p in model.parameters():
        p.requires_grad_(False)
    full = {}
    for name in fully_trainable:
        full[name] = params[name]
        full[name].requires_grad_(True)
    deltas = {}
    for name, index in indices.items():
        module_name, attr = _split(name)
        module = model.get_submodule(module_name)
        start = None if values is None else values[name]
        deltas[name] = SparseAdd(index.to(params[name].device), start)
        # unsafe: skip the consistency call at registration, which would compute and discard one weight.
        parametrize.register_parametrization(module, attr, deltas[name], unsafe=True)
    return SparseParams(deltas, full)


def detach(model: nn.Module, sparse: SparseParams) -> None:
    """Remove the parametrizations: the masked parameters become their frozen base values again."""
    for name in sparse.deltas:
        module_name, attr = _split(name)
        parametrize.remove_parametrizations(model.get_submodule(module_name), attr, leave_parametrized=False)


def extract(sparse: SparseParams) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """The trained change on the CPU: (indices int64, values fp32, full new values), keyed by parameter name."""
    indices = {n: d.index.detach().cpu().clone() for n, d in sparse.deltas.items()}
    values = {n: d.delta.detach().float().cpu().clone() for n, d in sparse.deltas.items()}
    full = {n: p.detach().cpu().clone() for n, p in sparse.full.items()}
    return indices, values, full


def apply_delta(
    base: Mapping[str, Tensor],
    indices: Mapping[str, Tensor],
    values: Mapping[str, Tensor],
    full: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """Merged weights: ``base`` with ``values`` added at ``indices`` and ``full`` tensors replaced (pure).

    The sum is computed exactly as the attached model computes it in the forward pass, so a model loaded with
    the merged weights gives the same outputs as the fine-tuned one.
    """
    merged = dict(base)
    for name, index in indices.items():
        w = base[name]
        merged[name] = w.reshape(-1).index_add(0, index.to(w.device).long(), values[name].to(w)).view_as(w)
    for name, value in full.items():
        merged[name] = value.to(base[name]) if name in base else value
    return merged


# ------------------------------------------------------------------------ recompute instead of saving weights

# Effective weights produced inside recompute_sparse_weights(): storage pointer -> (weak ref, owner, base).
_EFFECTIVE: dict[int, tuple[weakref.ref, SparseAdd, Tensor]] | None = None


def _register_effective(weight: Tensor, owner: SparseAdd, base: Tensor) -> None:
    if _EFFECTIVE is not None and torch.is_grad_enabled():
        _EFFECTIVE[weight.untyped_storage().data_ptr()] = (weakref.ref(weight), owner, base)


@contextlib.contextmanager
def recompute_sparse_weights() -> Iterator[None]:
    """Run a forward (and the backward it sets up) without saving the dense effective weights.

    A layer saves its weight for the backward pass (to compute the input's gradient). For an attached weight
    that is a dense temporary ``W_base + scatter(delta)``; inside this context it is saved as a recipe
    (which parametrization, and how the saved tensor views the weight) and rebuilt when the backward needs it,
    so the memory of a training step holds no copy of the masked weights. The delta must not change between
    the forward and its backward (true of any training step). The backward may run outside the context.
    """
    global _EFFECTIVE
    previous = _EFFECTIVE
    _EFFECTIVE = {}
    registry = _EFFECTIVE

    def pack(t: Tensor):
        found = registry.get(t.untyped_storage().data_ptr()) if t.device.type != "meta" else None
        if found is not None:
            ref, owner, base = found
            weight = ref()
            # Alive means its storage cannot have been reused by another tensor: the pointer still names it.
            if weight is not None and weight.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
                return (owner, base, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(packed):
        if isinstance(packed, Tensor):
            return packed
        owner, base, size, stride, offset = packed
        return owner.recompute(base).as_strided(size, stride, offset)

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _EFFECTIVE = previous
