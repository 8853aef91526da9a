"""FPS selection for any ``nn.Module`` and any batches: ``{module name: sorted flat indices}``.

The library form of ``fps select`` for people who train in their own loop (Hugging Face Trainer, accelerate,
PEFT), modelled on PEFT's EVA initialisation (``get_eva_state_dict(model, dataloader, forward_fn, ...)``): give a
model, an iterable of batches, optionally a ``forward_fn(model, batch)`` and the target modules, and get the
indices to train. It runs fps's own statistics hooks (:mod:`.activations`), scores (:mod:`.scoring`) and budgeted
selection (:mod:`.selector`, :mod:`.selection`), so budget, granularity, norm and tie rules are those of
``fps select`` (DESIGN.md section 2), and on a vision model with the same images it gives the same selection.

Language models: when a batch is a mapping with an ``attention_mask`` (a tokenizer's output), the statistics are
taken over the real tokens only; padding positions never count. Candidate layers are found by type, as in fps:
``nn.Linear`` and ``nn.Conv1d`` / ``nn.Conv2d``. GPT-2's attention and MLP weights live in transformers'
``Conv1D`` (a ``[in, out]`` matrix multiply, not an ``nn.Linear``), which fps does not select and PEFT's SHiRA
does not wrap; target them and the call says so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .activations import InputStats, autocast, input_stats_hooks, real_token_inputs
from .candidates import CANDIDATE_TYPES, ParameterRoles, parameter_roles
from .constants import DEFAULT_BUDGET
from .errors import DataError, FpsError, ModelError
from .formats import Mask
from .scoring import make_scores
from .selection import select
from .selector import SelectOptions, build_mask, selection_count

METHODS = ("fps", "activation", "weight", "random")  # gps needs labels and a loss: use fps select --method gps


class ForwardError(FpsError):
    """``forward_fn`` failed, or ran without reaching the targeted layers."""


@dataclass
class IndexSelection:
    """What :func:`select_indices` found.

    Attributes:
        indices: module name -> sorted flat (row-major) indices of the selected weight entries, int64; the layers
            with nothing selected are left out.
        stats: module name -> its input statistics (``abs_sum``, ``sq_sum``, ``count`` = tokens seen), for every
            targeted layer.
        modules: module name -> the targeted layer, in model order.
        fully_trainable: parameter names the budget counts as trained in full (the head, and biases with
            ``train_bias``); give their modules to PEFT as ``modules_to_save`` to spend the budget as fps does.
        selected: number of selected entries (exactly what the budget leaves after the fully trainable parts).
        total_params: all parameters of the model (the budget's denominator).
        options: method, norm, granularity and budget used.
        mask: the same selection as an fps mask (parameter names), for :func:`fps_cli.save_mask`.
        batches: how many batches the statistics pass ran.
    """

    indices: dict[str, Tensor]
    stats: dict[str, InputStats]
    modules: dict[str, nn.Module] = field(repr=False)
    fully_trainable: list[str]
    selected: int
    total_params: int
    options: SelectOptions
    mask: Mask = field(repr=False)
    batches: int = 0

    def statistic(self, name: str) -> Tensor:
        """The per-input statistic ``a`` of one layer (mean ``|x|`` for ``l1``, root mean square for ``l2``)."""
        return self.stats[name].statistic(self.options.norm)

    def scores(self, name: str) -> Tensor:
        """The scores of one layer, ``[rows, fan_in]`` fp32 (``|W| * a`` for ``fps``)."""
        return self._scores({name: self.modules[name]})[name]

    def _scores(self, modules: Mapping[str, nn.Module]) -> Mapping[str, Tensor]:
        return make_scores(
            self.options.method,
            modules,
            stats=self.stats,
            norm=self.options.norm,
            seed=self.options.seed,
        )

    def at_counts(self, counts: Mapping[str, int]) -> dict[str, Tensor]:
        """Re-select each layer on its own at a given count, with the same scores and the same granularity rule
        within the layer (``neuron``: every row its top ``count // rows``, the rest to the rows whose next score is
        highest; ties to the lower index). No data pass.

        Args:
            counts: module name -> how many entries to select in that layer.
        """
        out = {}
        for name, n in counts.items():
            scores = self._scores({name: self.modules[name]})
            granularity = "neuron" if self.options.granularity == "neuron" else "global"
            out[name] = select(scores, int(n), granularity).get(name, torch.zeros(0, dtype=torch.long))
        return out

    @property
    def shira_r(self) -> int:
        """SHiRA's ``r`` that spends this selection's count: SHiRA gives every targeted ``nn.Linear`` exactly
        ``r * (in + out)`` entries, so ``r = selected // sum(in + out)`` (at least 1)."""
        return max(1, self.selected // shira_width(self.modules))

    def shira_indices(self, r: int) -> dict[str, Tensor]:
        """The FPS selection at SHiRA's per-layer count ``r * (in + out)``, for every targeted ``nn.Linear``."""
        return self.at_counts({name: r * (m.in_features + m.out_features) for name, m in self.linear.items()})

    @property
    def linear(self) -> dict[str, nn.Module]:
        """The targeted ``nn.Linear`` layers (what SHiRA can wrap)."""
        return {name: m for name, m in self.modules.items() if isinstance(m, nn.Linear)}


def shira_width(modules: Mapping[str, nn.Module]) -> int:
    """``sum(in + out)`` over the ``nn.Linear`` layers: SHiRA's entries per unit of ``r``."""
    return sum(m.in_features + m.out_features for m in modules.values() if isinstance(m, nn.Linear)) or 1


def _matches(name: str, target_modules: str | Iterable[str]) -> bool:
    """PEFT's rule: a string is a regular expression the whole name must match; a list matches a name exactly or
    as a dotted suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def target_roles(model: nn.Module, roles: ParameterRoles, target_modules: str | Iterable[str] | None) -> ParameterRoles:
    """``roles`` with the candidates restricted to the target modules (the others become frozen).

    Raises:
        ModelError: the pattern matches no candidate layer (names what it matched instead).
    """
    if target_modules is not None and not isinstance(target_modules, str):
        target_modules = list(target_modules)

    def wanted(name: str) -> bool:
        return target_modules is None or _matches(name, target_modules)

    kept = {p: m for p, m in roles.candidates.items() if wanted(p.rsplit(".", 1)[0])}
    if not kept:
        matched = [(n, type(m).__name__) for n, m in model.named_modules() if n and wanted(n)]
        types = ", ".join(t.__name__ for t in CANDIDATE_TYPES)
        if target_modules is None:
            message = f"{type(model).__name__} has no {types} layer outside its head to select from"
        else:
            what = ", ".join(f"{n} ({t})" for n, t in matched[:5])
            what += f" and {len(matched) - 5} more" if len(matched) > 5 else ""
            message = f"target_modules {target_modules!r} matches no {types} layer outside the head" + (
                f"; it matches {what}" if matched else f" of {type(model).__name__}"
            )
        if any(t == "Conv1D" for _, t in matched):
            message += (
                "; transformers' Conv1D (GPT-2's attention and MLP) is not an nn.Linear: fps does not select it and "
                "PEFT's SHiRA does not wrap it"
            )
        raise ModelError(message)
    if target_modules is None:
        return roles
    # The layers left out are frozen whole: their weights, and their biases too.
    dropped = {p for p in roles.candidates if p not in kept}
    dropped |= {p.rsplit(".", 1)[0] + ".bias" for p in dropped}
    fully = [p for p in roles.fully_trainable if p not in dropped]
    frozen = [p for p in roles.shapes if p not in kept and p not in fully]
    return ParameterRoles(kept, fully, frozen, roles.shapes)


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping (a tokenizer's output), ``model(batch[0])`` for an ``(inputs, labels)``
    pair, else ``model(batch)``. Labels in a mapping are dropped: the statistics need no loss."""
    if isinstance(batch, Mapping):
        return model(**{k: v for k, v in batch.items() if k != "labels"})
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to(v, device) for v in batch)
    return batch


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        raise ModelError(f"{type(model).__name__} has no parameters to select") from None


class _RealTokens:
    """Keeps the current batch's ``attention_mask`` and restricts each layer input to its real tokens."""

    def __init__(self) -> None:
        self.keep: Tensor | None = None  # [batch, seq] bool

    def set(self, batch: Any) -> None:
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        self.keep = mask.bool() if isinstance(mask, Tensor) else None

    def __call__(self, name: str, x: Tensor) -> Tensor:
        real = real_token_inputs(x, self.keep)
        if real is None:
            raise ForwardError(
                f"layer {name} sees an input of shape {list(x.shape)}, which does not line up with the batch's "
                f"attention_mask {list(self.keep.shape)} ([batch, seq, features] expected); leave it out of "
                "target_modules, or drop attention_mask from the batch to count every token"
            )
        return real


def _hidden_padding_mask(batch: Any) -> int | None:
    """The position of what looks like an attention mask in a tuple / list batch: a ``[batch, seq]`` tensor of 0 and
    1 with some 0 (padding), beside integer token ids of the same shape. fps only finds a mask by its name in a
    mapping, so such padding would be counted as tokens."""
    if not isinstance(batch, (tuple, list)):
        return None
    tensors = [(i, t) for i, t in enumerate(batch) if isinstance(t, Tensor) and t.dim() == 2]
    ids = [t for _, t in tensors if not t.is_floating_point() and t.dtype != torch.bool]
    for i, t in tensors:
        if t.is_floating_point():
            continue
        if not ((t == 0) | (t == 1)).all() or bool(t.all()):
            continue  # not 0/1, or no padding at all: nothing to leave out
        if any(other is not t and other.shape == t.shape and not ((other == 0) | (other == 1)).all() for other in ids):
            return i
    return None


def select_indices(
    model: nn.Module,
    batches: Iterable[Any],
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    *,
    target_modules: str | Iterable[str] | None = None,
    budget: float | None = DEFAULT_BUDGET,
    topk_per_neuron: int | None = None,
    method: str = "fps",
    norm: str = "l1",
    granularity: str = "neuron",
    train_bias: bool = True,
    head: Iterable[nn.Module] | None = None,
    precision: str = "fp32",
    seed: int = 0,
    count_padding: bool = False,
) -> IndexSelection:
    """Select the weight entries of ``model`` worth fine-tuning, with one gradient-free pass over ``batches``.

    Padding: the statistics leave padding out only when a batch is a mapping with an ``attention_mask`` (a
    tokenizer's output, e.g. ``{"input_ids": ..., "attention_mask": ...}``). A tuple batch such as
    ``(input_ids, attention_mask)`` with a ``forward_fn`` hides the mask from fps, which would count every padding
    position as a token: such batches are refused (pass them as mappings, or ``count_padding=True`` to count every
    position on purpose).

    Example (a causal language model, padding excluded through the tokenizer's ``attention_mask``):
        >>> batches = [tokenizer(texts, padding=True, return_tensors="pt") for texts in chunks]
        >>> sel = select_indices(model, batches, target_modules=["q_proj", "v_proj"], budget=0.01, head=[],
        ...                      train_bias=False)
        >>> sel.indices["model.layers.0.self_attn.q_proj"]  # sorted flat indices into its weight

    Args:
        model: any ``nn.Module``, already on its device; it is put in eval mode for the pass and restored.
        batches: an iterable of batches (a DataLoader, a list): tensors, ``(inputs, labels)`` pairs or mappings.
            Tensors in a batch are moved to the model's device.
        forward_fn: ``forward_fn(model, batch)`` runs the model on one batch; its output is not used (the
            statistics come from hooks). Default: :func:`default_forward`.
        target_modules: the layers to select from, by PEFT's rule (a regex the whole module name must match, or a
            list of names / dotted suffixes); default: every ``nn.Linear`` / ``nn.Conv`` outside the head.
        budget: fraction of all the model's parameters trainable in total: the selected entries plus the fully
            trainable ones (:attr:`IndexSelection.fully_trainable`), as in ``fps select --budget``.
        topk_per_neuron: instead of ``budget``, exactly this many entries per row (GPS's setting).
        method: ``fps`` (``|W| * a``), ``activation``, ``weight`` or ``random``.
        norm: ``l1`` (mean ``|x|``) or ``l2`` (root mean square) activation statistic.
        granularity: ``neuron``, ``layer`` or ``global``.
        train_bias: the budget counts the biases of the targeted layers as fully trained.
        head: the task head (fully trained, counted in the budget); default: found through the model's API
            (timm ``get_classifier()``, transformers: outside ``base_model``, e.g. ``lm_head``). Pass ``[]`` when
            nothing but the selected entries will be trained (the head is then a candidate layer like any other,
            unless ``target_modules`` leaves it out).
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast for the forward pass (statistics stay fp32 or better).
        seed: seed of the ``random`` method.
        count_padding: accept tuple batches that carry a padding mask fps cannot find (see above).

    Raises:
        ModelError: ``target_modules`` matches no candidate layer.
        DataError: ``batches`` is empty, or a tuple batch carries what looks like an attention mask (without
            ``count_padding``).
        ForwardError: ``forward_fn`` raised, or never reached a targeted layer.
        BudgetError: the budget cannot be met.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} for select_indices; expected one of {METHODS}")
    options = SelectOptions(
        method=method,
        norm=norm,
        granularity=granularity,
        budget=None if topk_per_neuron is not None else budget,
        topk_per_neuron=topk_per_neuron,
        train_bias=train_bias,
        seed=seed,
    )
    forward_fn = default_forward if forward_fn is None else forward_fn
    if not callable(forward_fn):
        raise ForwardError(f"forward_fn must be callable as forward_fn(model, batch), got {type(forward_fn).__name__}")
    roles = target_roles(model, parameter_roles(model, train_bias=train_bias, head=head), target_modules)
    n = selection_count(roles, options.budget) if topk_per_neuron is None else None  # fail before the pass
    device = _model_device(model)

    tokens = _RealTokens()
    count = 0
    was_training = model.training
    model.eval()
    try:
        with (
            input_stats_hooks(roles.candidates, tokens) as stats,
            torch.inference_mode(),
            autocast(device, precision),
        ):
            for batch in batches:
                hidden = None if count_padding or count else _hidden_padding_mask(batch)
                if hidden is not None:
                    raise DataError(
                        f"batch 0 is a {type(batch).__name__} whose item {hidden} looks like an attention_mask "
                        "(0/1, with padding, shaped like the token ids); fps only finds a mask by name, so padding "
                        "would be counted as tokens: pass each batch as a mapping, e.g. {'input_ids': ids, "
                        "'attention_mask': mask} (forward_fn then gets the mapping), or count_padding=True to "
                        "count every position"
                    )
                batch = _to(batch, device)
                tokens.set(batch)
                try:
                    forward_fn(model, batch)
                except ForwardError:
                    raise
                except Exception as e:
                    raise ForwardError(f"forward_fn failed on batch {count}: {type(e).__name__}: {e}") from e
                count += 1
    finally:
        model.train(was_training)
    if count == 0:
        raise DataError("batches is empty: select_indices needs at least one batch to gather statistics")
    unreached = [p.rsplit(".", 1)[0] for p, s in stats.items() if s.count == 0]
    if len(unreached) == len(stats):
        raise ForwardError(
            f"forward_fn ran {count} batches but no targeted layer saw any input; it must call the model, e.g. "
            "forward_fn=lambda model, batch: model(**batch)"
        )
    if unreached:
        raise ForwardError(
            f"{len(unreached)} targeted layers never saw an input ({', '.join(unreached[:5])}"
            f"{', ...' if len(unreached) > 5 else ''}); leave them out of target_modules"
        )

    scores = make_scores(method, roles.candidates, stats=stats, norm=norm, seed=seed)
    mask = build_mask(roles, scores, options)
    module_of = {p: p.rsplit(".", 1)[0] for p in roles.candidates}
    return IndexSelection(
        indices={module_of[p]: idx for p, idx in mask.indices.items()},
        stats={module_of[p]: s for p, s in stats.items()},
        modules={module_of[p]: m for p, m in roles.candidates.items()},
        fully_trainable=list(roles.fully_trainable),
        selected=n if n is not None else sum(int(i.numel()) for i in mask.indices.values()),
        total_params=roles.total_params,
        options=options,
        mask=mask,
        batches=count,
    )


def dense_mask(indices: Tensor, weight: Tensor) -> Tensor:
    """A 0/1 mask shaped like ``weight``, of its dtype and device, with ones at the flat ``indices``."""
    mask = torch.zeros(weight.numel(), dtype=weight.dtype, device=weight.device)
    mask[indices.to(weight.device)] = 1
    return mask.view(weight.shape)
