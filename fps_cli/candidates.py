"""Which parameters are scored, which are fully trainable and which stay frozen (DESIGN.md section 2).

Modules are classified by type, never by name: the weights of ``Linear`` and ``Conv1d`` / ``Conv2d`` layers in
the backbone are candidates for selection; the task head is fully trainable; the biases of those layers are
fully trainable unless ``train_bias=False``; everything else (normalisation layers, position embeddings,
class / register tokens, other embeddings) is frozen.

A tied weight (one tensor used by several modules, e.g. two Linears sharing a weight, or a language model's
``lm_head`` sharing the embedding) is never a candidate: its gradient sums every use, while its input statistic
would be one module's, and a partial delta on one module would not reach the others. It stays frozen (and
:func:`fps_cli.sparse.attach` refuses to train part of it); train it in full by listing it as fully trainable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import nn

CANDIDATE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)


@dataclass(frozen=True)
class ParameterRoles:
    """The role of every parameter of a model, in ``named_parameters()`` order.

    Attributes:
        candidates: weight parameter name -> the Linear / Conv module that owns it.
        fully_trainable: names of parameters trained in full (head, and biases when enabled).
        frozen: names of parameters that never change.
        shapes: every parameter's shape.
    """

    candidates: dict[str, nn.Module]
    fully_trainable: list[str]
    frozen: list[str]
    shapes: dict[str, tuple[int, ...]] = field(repr=False)

    @property
    def total_params(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())

    @property
    def fully_trainable_params(self) -> int:
        return sum(_numel(self.shapes[n]) for n in self.fully_trainable)

    @property
    def candidate_params(self) -> int:
        return sum(_numel(self.shapes[n]) for n in self.candidates)


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def baseline_trainable(model: nn.Module, method: str, head: Iterable[nn.Module] | None = None) -> list[str]:
    """The parameters a baseline trains in full, in ``named_parameters()`` order.

    ``full``: every parameter (norms, position embeddings and tokens included). ``linear``: the head only (linear
    probing). ``bias``: the head and the bias of every module that has one, normalisation layers included (BitFit,
    Ben Zaken et al. 2022).

    Args:
        model: the model as built for the task (new head included).
        method: ``full``, ``linear`` or ``bias``.
        head: the head modules; default: found with :func:`find_head`.
    """
    if method not in ("full", "linear", "bias"):
        raise ValueError(f"unknown baseline {method!r}; expected full, linear or bias")
    head_ids = {id(p) for h in (find_head(model) if head is None else head) for p in h.parameters()}
    biases = {id(m.bias) for m in model.modules() if isinstance(getattr(m, "bias", None), nn.Parameter)}
    keep = {
        "full": lambda p: True,
        "linear": lambda p: id(p) in head_ids,
        "bias": lambda p: id(p) in head_ids or id(p) in biases,
    }[method]
    return [name for name, p in model.named_parameters() if keep(p)]


def find_head(model: nn.Module) -> list[nn.Module]:
    """The task head module(s), found through the model's own API.

    timm: ``get_classifier()``. Hugging Face transformers: every child module outside the base model
    (``getattr(model, model.base_model_prefix)``), e.g. ``classifier``, or both heads of a distilled DeiT.
    """
    get_classifier = getattr(model, "get_classifier", None)
    if get_classifier is None:
        prefix = getattr(model, "base_model_prefix", None)
        base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
        if not isinstance(base, nn.Module) or base is model:
            return []
        head = [child for child in model.children() if child is not base]
    else:
        head = get_classifier()
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module) and any(True for _ in h.parameters())]


def parameter_roles(
    model: nn.Module,
    *,
    train_bias: bool = True,
    head: Iterable[nn.Module] | None = None,
) -> ParameterRoles:
    """Classify every parameter of ``model``.

    Args:
        model: the model as built for the task (new head included).
        train_bias: make the biases of Linear / Conv layers fully trainable.
        head: the head modules; default: found with :func:`find_head`.
    """
    head_modules = list(find_head(model) if head is None else head)
    head_params = {id(p) for h in head_modules for p in h.parameters()}

    # Map each parameter to the module that owns it directly, so biases can be told from norm parameters.
    owner: dict[int, nn.Module] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), module)

    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1

    candidates: dict[str, nn.Module] = {}
    fully_trainable: list[str] = []
    frozen: list[str] = []
    shapes: dict[str, tuple[int, ...]] = {}
    for name, p in model.named_parameters():
        shapes[name] = tuple(p.shape)
        module = owner[id(p)]
        if id(p) in head_params:
            fully_trainable.append(name)
        elif isinstance(module, CANDIDATE_TYPES) and p is module.weight and uses[id(p)] == 1:
            candidates[name] = module
        elif isinstance(module, CANDIDATE_TYPES) and p is module.bias and train_bias:
            fully_trainable.append(name)
        else:
            frozen.append(name)
    return ParameterRoles(candidates, fully_trainable, frozen, shapes)
