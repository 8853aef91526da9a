"""FPS and Hugging Face PEFT: a SHiRA ``mask_fn`` from an FPS selection, and an fps delta as a SHiRA adapter.

PEFT (0.21) ships two sparse tuners that store their entries explicitly: SHiRA (``shira_indices`` int32
``[2, nnz]`` row / column, ``shira_weight`` fp32 ``[nnz]`` per ``nn.Linear``) and Super-Tuning (flat int32
``supertuning_indices`` and fp32 ``supertuning_values``). Both add the stored values to the frozen weight once, in
fp32, as fps does, so both reproduce a delta bit for bit, and both need padding, because both fix each layer's
count from its shape: SHiRA to ``r * (in + out)`` for one ``r``, Super-Tuning to ``int(in * out * (1 - sparsity))``
for one ``sparsity``. fps exports SHiRA: it is the only one of the two that accepts given indices for training
(``mask_fn``; Super-Tuning always picks its support by ``|W|`` when a layer is built, and only a saved adapter
overwrites it), so an fps run exported here and an FPS selection trained in PEFT (:func:`shira_mask_fn`) are the
same kind of adapter; its loader takes the stored indices as they are (Super-Tuning first runs a magnitude top-k
over every weight, then overwrites it); and SHiRA is in more PEFT releases (merged June 2025, huggingface/peft#2584;
Super-Tuning August 2026, #3518). The cost is 12 bytes per stored entry (fps and Super-Tuning: 8) plus the
zero-valued padding (README "Use with PEFT" gives the measured overhead).

The adapter folder (DESIGN.md section 4) holds ``adapter_config.json`` (``peft_type: SHIRA``, ``r``,
``mask_type: "fps"``, ``target_modules``, ``modules_to_save``) and ``adapter_model.safetensors``:

- per masked ``nn.Linear`` ``<path>``: ``base_model.model.<path>.shira_indices`` / ``.shira_weight``, the delta's
  entries plus zero-valued entries at the lowest unselected positions up to ``r * (in + out)``;
- the fully trained bias of such a layer: ``base_model.model.<path>.base_layer.bias``, loaded by PEFT's
  ``load_state_dict(strict=False)`` exactly like LoRA's ``bias="all"`` biases (SHiRA's config has no ``bias``
  switch, so a PEFT ``save_pretrained`` of the loaded model drops them: merge first, or export again);
- every other changed module (the head; a masked layer SHiRA cannot wrap, such as a ``Conv2d`` patch embedding,
  or an ``nn.Linear`` too small for ``r``): in ``modules_to_save``, whole, with its fine-tuned values. This is the
  documented fallback for layers PEFT cannot hold sparsely: exact, at the cost of the full tensor.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from . import __version__
from .errors import FileFormatError, FpsError
from .formats import Delta, read_delta
from .indices import IndexSelection, dense_mask
from .models import ModelSpec

if TYPE_CHECKING:
    from .outputs import Transaction

PEFT_EXTRA = "pip install 'fps-cli[peft]'"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."


def require_peft() -> Any:
    """Import ``peft`` or say which extra installs it."""
    try:
        import peft
    except ImportError:
        raise FpsError(f"this needs Hugging Face PEFT, which is not installed; {PEFT_EXTRA}") from None
    return peft


# ------------------------------------------------------------------------------------------- mask_fn


def shira_mask_fn(selection: IndexSelection) -> Callable[..., Tensor]:
    """A SHiRA ``mask_fn`` that gives every targeted layer its FPS top entries at SHiRA's count.

    SHiRA calls ``mask_fn(base_layer, r, **kwargs)`` for each targeted ``nn.Linear`` without its name, so the layer
    is looked up by identity among ``selection.modules``; the mask holds the layer's FPS selection at
    ``r * (in + out)`` entries (:meth:`IndexSelection.shira_indices`), as a dense 0/1 tensor of the weight's dtype
    and device.

    Example:
        >>> sel = select_indices(model, batches, target_modules=["q_proj", "v_proj"], head=[], train_bias=False)
        >>> config = ShiraConfig(r=sel.shira_r, mask_type="fps", target_modules=["q_proj", "v_proj"])
        >>> config.mask_fn = shira_mask_fn(sel)
        >>> peft_model = get_peft_model(model, config)

    Raises (inside ``get_peft_model``):
        FpsError: SHiRA targets a layer that ``select_indices`` did not.
    """
    names = {id(m): n for n, m in selection.modules.items()}

    def copied(layer: nn.Module) -> str | None:
        """The selected layer ``layer`` is an equal copy of (same type, shape and values), if any."""
        for n, m in selection.modules.items():
            w = getattr(m, "weight", None)
            same = type(m) is type(layer) and w is not None and w.shape == layer.weight.shape
            if same and torch.equal(w.detach().cpu(), layer.weight.detach().cpu()):
                return n
        return None

    def mask_fn(base_layer: nn.Module, r: int, **kwargs: Any) -> Tensor:
        name = names.get(id(base_layer))
        if name is None and copied(base_layer) is not None:
            raise FpsError(
                f"SHiRA's mask_fn matches layers by identity, not by name: this {type(base_layer).__name__} is a copy "
                f"of {copied(base_layer)}, not the layer object select_indices scored (was the model copied or "
                "reloaded after select_indices?); call get_peft_model on the same model object given to "
                "select_indices"
            )
        if name is None:
            raise FpsError(
                f"SHiRA targets a {type(base_layer).__name__} that select_indices did not target; give "
                "ShiraConfig the same target_modules as select_indices"
            )
        count = r * (base_layer.in_features + base_layer.out_features)
        return dense_mask(selection.at_counts({name: count})[name], base_layer.weight)

    return mask_fn


# --------------------------------------------------------------------------------------------- export


@dataclass
class AdapterPlan:
    """How a delta maps onto a SHiRA adapter.

    Attributes:
        r: SHiRA's rank: every sparse layer stores ``r * (in + out)`` entries.
        sparse: module name -> its ``nn.Linear`` (stored sparsely).
        whole: module name -> why it travels whole in ``modules_to_save`` (``head``, ``Conv2d``, ...).
        biases: fully trained parameters of sparse layers, stored as ``<module>.base_layer.<name>``.
    """

    r: int
    sparse: dict[str, nn.Linear]
    whole: dict[str, str]
    biases: list[str] = field(default_factory=list)


@dataclass
class ExportResult:
    """What :func:`export_peft` wrote.

    Attributes:
        path: the adapter folder.
        r: SHiRA's rank.
        sparse_layers: layers stored sparsely.
        modules_to_save: modules stored whole, with why (``head``, ``Conv2d``, ...).
        entries: trained entries of the sparse layers (the delta's).
        padded: zero-valued entries added to reach ``r * (in + out)`` per layer.
        whole_params: parameters stored whole in ``modules_to_save``.
        bytes: size of ``adapter_model.safetensors``.
        delta_bytes: size of the delta file (when exported from a file).
    """

    path: Path
    r: int
    sparse_layers: int
    modules_to_save: dict[str, str]
    entries: int
    padded: int
    whole_params: int
    bytes: int
    delta_bytes: int | None = None


def _module_of(param: str) -> tuple[str, str]:
    module, _, attr = param.rpartition(".")
    return module, attr


def _inside(name: str, parent: str) -> bool:
    return parent == "" or name == parent or name.startswith(parent + ".")


def plan_adapter(model: nn.Module, delta: Delta) -> AdapterPlan:
    """Decide which changed tensors SHiRA holds sparsely and which travel whole (pure: reads shapes only).

    Raises:
        FileFormatError: the delta has no partially trained ``nn.Linear`` weight, or changes a parameter of the
            model's root module, which ``modules_to_save`` cannot hold (all such named at once).
    """
    modules = dict(model.named_modules())
    sparse: dict[str, nn.Linear] = {}
    whole: dict[str, str] = {}
    for name in delta.indices:
        module, attr = _module_of(name)
        layer = modules.get(module)
        if isinstance(layer, nn.Linear) and attr == "weight":
            sparse[module] = layer
        else:
            whole[module] = type(layer).__name__
    for name in delta.full:
        module, _ = _module_of(name)
        if module not in sparse:
            whole.setdefault(module, "fully trained")
    root = sorted(n for n in [*delta.indices, *delta.full] if _module_of(n)[0] == "")
    if root:
        raise FileFormatError(
            f"the delta changes parameters of the model's root module ({', '.join(root)}), which a PEFT adapter "
            "cannot hold (modules_to_save takes submodules); export is not possible for this delta"
        )
    # A module inside one that travels whole is covered by it.
    whole = {n: why for n, why in whole.items() if not any(o != n and _inside(n, o) for o in whole)}
    sparse = {n: m for n, m in sparse.items() if not any(_inside(n, o) for o in whole)}

    counts = {n: int(delta.indices[f"{n}.weight"].numel()) for n in sparse}
    while sparse:
        r = max(max(1, math.ceil(counts[n] / (m.in_features + m.out_features))) for n, m in sparse.items())
        # SHiRA refuses r * (in + out) > in * out: such a layer is too small for r and travels whole.
        small = [n for n, m in sparse.items() if r * (m.in_features + m.out_features) > m.weight.numel()]
        if not small:
            break
        for n in small:
            whole[n] = f"nn.Linear too small for SHiRA r={r}"
            del sparse[n]
    if not sparse:
        raise FileFormatError(
            "the delta trains no nn.Linear weight partially, so a SHiRA adapter would hold nothing sparse "
            f"(changed modules: {', '.join(whole) or 'none'}); use fps merge for a full model instead"
        )
    biases = [name for name in delta.full if _module_of(name)[0] in sparse]
    return AdapterPlan(r, sparse, whole, biases)


def _padded(index: Tensor, values: Tensor, size: int, count: int) -> tuple[Tensor, Tensor]:
    """``index`` / ``values`` grown to ``count`` entries with zeros at the lowest unselected positions, sorted."""
    extra = count - index.numel()
    if extra <= 0:
        return index, values
    free = torch.ones(size, dtype=torch.bool)
    free[index] = False
    pad = free.nonzero().squeeze(1)[:extra]
    order_index = torch.cat([index, pad])
    order = order_index.argsort()
    return order_index[order], torch.cat([values, torch.zeros(extra, dtype=values.dtype)])[order]


def adapter_tensors(model: nn.Module, delta: Delta, plan: AdapterPlan) -> tuple[dict[str, Tensor], int]:
    """The adapter's tensors under PEFT's names, and the number of padding entries.

    Whole modules hold the model's fine-tuned state (parameters and persistent buffers), computed as
    :func:`fps_cli.sparse.apply_delta` computes a merge.
    """
    from .sparse import apply_delta

    tensors: dict[str, Tensor] = {}
    padded = 0
    for name, layer in plan.sparse.items():
        out_f, in_f = layer.weight.shape
        index, values = _padded(
            delta.indices[f"{name}.weight"].long(),
            delta.values[f"{name}.weight"].float(),
            layer.weight.numel(),
            plan.r * (in_f + out_f),
        )
        padded += plan.r * (in_f + out_f) - int(delta.indices[f"{name}.weight"].numel())
        tensors[f"{PREFIX}{name}.shira_indices"] = torch.stack([index // in_f, index % in_f]).to(torch.int32)
        tensors[f"{PREFIX}{name}.shira_weight"] = values
    for param in plan.biases:
        module, attr = _module_of(param)
        tensors[f"{PREFIX}{module}.base_layer.{attr}"] = delta.full[param].float()
    state = model.state_dict()
    for module in plan.whole:
        keys = [k for k in state if k.startswith(module + ".")]
        base = {k: state[k] for k in keys}
        merged = apply_delta(
            base,
            {k: delta.indices[k] for k in keys if k in delta.indices},
            {k: delta.values[k] for k in keys if k in delta.indices},
            {k: delta.full[k] for k in keys if k in delta.full},
        )
        tensors.update({PREFIX + k: v.detach().contiguous() for k, v in merged.items()})
    return tensors, padded


# PEFT's task_type for fps's tasks that have one (a causal LM: PeftModelForCausalLM, AutoPeftModelForCausalLM).
PEFT_TASK_TYPES = {"causal-lm": "CAUSAL_LM"}


def adapter_config(
    plan: AdapterPlan,
    base_model: str | None,
    *,
    revision: str | None = None,
    auto_mapping: dict | None = None,
    task_type: str | None = None,
) -> dict[str, Any]:
    """``adapter_config.json`` as PEFT's ``ShiraConfig`` writes it (``auto_mapping``: as ``PeftModel.save_pretrained``
    adds it for a model without a ``task_type``, so that ``AutoPeftModel.from_pretrained(DIR)`` finds the class)."""
    peft = require_peft()
    config = peft.ShiraConfig(
        task_type=task_type,
        r=plan.r,
        mask_type="fps",  # SHiRA reloads the stored indices and needs no mask_fn; the name records their origin
        target_modules=sorted(plan.sparse),
        modules_to_save=sorted(plan.whole) or None,
        base_model_name_or_path=base_model,
        revision=revision,
        inference_mode=True,
    )
    out = config.to_dict()
    out["target_modules"] = sorted(plan.sparse)
    out["peft_version"] = peft.__version__
    if auto_mapping is not None:
        out["auto_mapping"] = auto_mapping
    return json.loads(json.dumps(out, default=str))


def base_identity(model: nn.Module, name: str | None) -> tuple[str | None, str | None, dict | None]:
    """``(base_model_name_or_path, revision, auto_mapping)`` of the adapter config: names the loaders resolve.

    A transformers model (``hf:ID_OR_PATH``) is recorded as transformers names it (``google/vit-base-patch16-224``
    or the folder, without fps's ``hf:``; a ``@revision`` as PEFT's ``revision``), with the ``auto_mapping`` PEFT
    writes (its class and module), so ``AutoPeftModel.from_pretrained(DIR)`` rebuilds base and adapter. A timm model
    keeps its timm name (``vit_base_patch16_224.augreg_in21k``, ``hf-hub:...``, ``local-dir:...``), which
    ``timm.create_model`` resolves; PEFT has no auto class for timm models, so it gets no ``auto_mapping``.
    """
    from .hf import HF_PREFIX, is_hf_model

    if name is None or not name.startswith(HF_PREFIX) or not is_hf_model(model):
        return name, None, None
    source = name[len(HF_PREFIX) :]
    revision = None
    if not Path(source).expanduser().is_dir():
        source, _, revision = source.partition("@")
    cls = type(model)
    return source, revision or None, {"base_model_class": cls.__name__, "parent_library": cls.__module__}


def _check_suffixes(model: nn.Module, names: list[str]) -> None:
    """PEFT matches ``modules_to_save`` by plain suffix; make sure each name picks exactly its own module."""
    keys = [k for k, _ in model.named_modules()]
    clashes = [f"{n} (also {k})" for n in names for k in keys if k != n and k.endswith(n)]
    if clashes:
        raise FileFormatError(
            "PEFT would apply modules_to_save to more modules than the delta changes: " + "; ".join(clashes)
        )


ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)


def write_adapter_folder(
    path: Path,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    config: Mapping[str, Any],
    *,
    tx: Transaction | None = None,
) -> None:
    """Write the adapter folder through :mod:`.outputs`: a new folder appears whole, an existing one gets both files
    in one group commit, and nothing else in it is touched (check it with an
    :class:`~fps_cli.outputs.OutputPlan` first; ``tx``: the plan's transaction, default: one that replaces)."""
    from .formats import write_atomic
    from .outputs import Transaction

    if tx is None:
        with Transaction(replace=True) as own:
            write_adapter_folder(path, tensors, metadata, config, tx=own)
        return

    def writer(staging: Path) -> None:
        (staging / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2, sort_keys=True) + "\n")
        write_atomic(staging / WEIGHTS_NAME, tensors, metadata, tx=None)

    tx.write_folder(path, writer)


def load_base(delta: Delta | str | os.PathLike, spec: ModelSpec | None = None) -> nn.Module:
    """The base model a delta was trained on, rebuilt as it records (or as ``spec`` says) and checked as ``fps merge``
    checks it, in eval mode: what ``PeftModel.from_pretrained(base, adapter)`` needs.

    Raises:
        FileFormatError: the model is not the delta's base.
    """
    from .merge import build_checked_base

    source = "the delta" if isinstance(delta, Delta) else str(delta)
    delta = delta if isinstance(delta, Delta) else read_delta(delta)
    return build_checked_base(delta, spec, source).eval()


def export_peft(
    delta: Delta | str | os.PathLike,
    out: str | os.PathLike,
    *,
    spec: ModelSpec | None = None,
    force: bool = False,
    source: str | None = None,
    tx: Transaction | None = None,
) -> ExportResult:
    """Write an fps delta as a PEFT SHiRA adapter folder that ``PeftModel.from_pretrained(base, out)`` loads.

    The base is rebuilt as the delta records it (or as ``spec`` says) and checked as ``fps merge`` checks it, so an
    adapter is only written for the model it belongs to.

    Example:
        >>> export_peft("delta.safetensors", "adapter/")
        >>> model = PeftModel.from_pretrained(base, "adapter/")  # the fine-tuned model's logits

    Args:
        delta: a delta (or its file).
        out: the adapter folder; an existing folder that is not empty needs ``force`` (and then only the adapter's
            two files are replaced).
        spec: the base model; default: the one the delta records.
        force: write into an existing folder.
        source: how to name the delta in messages.
        tx: the transaction of an :class:`~fps_cli.outputs.OutputPlan` the caller checked (the CLI's); default: a
            plan of this call's own, checked before any work.

    Raises:
        FpsError: ``peft`` is not installed.
        OutputExistsError: ``out`` exists and ``force`` is false.
        FileFormatError: the model is not the delta's base, or the delta cannot become an adapter. Nothing is
            written then.
    """
    from .merge import build_checked_base

    require_peft()
    from .outputs import OutputPlan

    path = Path(out)
    own_plan = None
    if tx is None:
        own_plan = OutputPlan(force=force)
        own_plan.input(delta if not isinstance(delta, Delta) else None, "--delta")
        own_plan.folder(path, "--out", ADAPTER_FILES)
        own_plan.check()
    delta_bytes = None
    if not isinstance(delta, Delta):
        source = source or str(delta)
        delta_bytes = Path(delta).stat().st_size if Path(delta).is_file() else None
        delta = read_delta(delta)
    source = source or "the delta"
    model = build_checked_base(delta, spec, source)
    plan = plan_adapter(model, delta)
    _check_suffixes(model, sorted(plan.whole))
    tensors, padded = adapter_tensors(model, delta, plan)
    prov = delta.provenance
    identity = ("model", "pretrained_tag", "checkpoint", "num_classes", "img_size", "mask_sha256")
    metadata = {
        "format": "pt",
        "fps.created_by": f"fps_cli {__version__}",
        "fps.exported_from": json.dumps({k: prov.get(k) for k in identity}),
        "fps.padding": json.dumps(padded),
    }
    name = spec.name if spec is not None else prov.get("model")
    base_name, revision, auto_mapping = base_identity(model, name)
    task_type = PEFT_TASK_TYPES.get(prov.get("task") or "")
    config = adapter_config(plan, base_name, revision=revision, auto_mapping=auto_mapping, task_type=task_type)
    if own_plan is None:
        write_adapter_folder(path, tensors, metadata, config, tx=tx)
        size = tx.staged(path / WEIGHTS_NAME).stat().st_size
    else:
        with own_plan.transaction() as own:
            write_adapter_folder(path, tensors, metadata, config, tx=own)
            size = own.staged(path / WEIGHTS_NAME).stat().st_size
    whole_params = sum(
        int(t.numel()) for k, t in tensors.items() if any(k.startswith(f"{PREFIX}{m}.") for m in plan.whole)
    )
    return ExportResult(
        path=path,
        r=plan.r,
        sparse_layers=len(plan.sparse),
        modules_to_save=dict(plan.whole),
        entries=sum(int(delta.indices[f"{n}.weight"].numel()) for n in plan.sparse),
        padded=padded,
        whole_params=whole_params,
        bytes=size,
        delta_bytes=delta_bytes,
    )
