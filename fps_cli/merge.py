"""``fps merge`` as library calls: base weights + a sparse delta -> the full fine-tuned weights.

The base is rebuilt as the delta records it (the model, its pretrained tag or checkpoint, the seed of a
``--no-pretrained`` model, the head size and image size; :func:`.finetune.build_base`), checked against the
checksums training recorded, and the delta is added with :func:`.sparse.apply_delta`, exactly as the attached
model computed it, so the merged weights give the fine-tuned model's outputs bit for bit (in fp32).

Two outputs (DESIGN.md section 4):

- a single safetensors file: the model's full ``state_dict()`` (parameters and persistent buffers), which a
  fresh model of the same architecture loads with ``load_state_dict`` (or timm's
  ``pretrained_cfg_overlay=dict(file=..., num_classes=N)``);
- a timm ``local-dir:`` folder: ``model.safetensors`` plus the ``config.json`` timm's own exporter writes
  (``architecture``, ``num_classes``, ``model_args`` such as ``img_size``, and a ``pretrained_cfg`` whose
  ``input_size`` is the one the model was trained at), so ``timm.create_model("local-dir:DIR", pretrained=True)``
  needs no other argument.

Memory: the merge replaces one tensor at a time in the model's own state dict, so its peak is the base model plus
the one tensor being merged (safetensors writes straight from the tensors' memory).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from . import __version__
from .errors import FileFormatError, OutputExistsError
from .formats import Delta, read_delta, weights_digest, write_atomic
from .hf import PROCESSOR_FILE as HF_PROCESSOR_NAME
from .hf import is_hf_model, save_hf_pretrained
from .models import ModelSpec
from .outputs import Transaction

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
_WAY_OUT = "pass the same --model / --checkpoint / --pretrained as when it was trained"


@dataclass(frozen=True)
class MergeTarget:
    """Where merged weights go.

    Attributes:
        path: the file, or the folder of a ``local-dir:`` export.
        directory: write ``model.safetensors`` + ``config.json`` into ``path``.
    """

    path: Path
    directory: bool = False

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_NAME if self.directory else self.path


@dataclass
class MergeResult:
    """What a merge wrote.

    Attributes:
        target: where.
        model: the base model's name.
        dtype: ``fp32``, ``bf16`` or ``fp16``.
        tensors: tensors written (parameters and persistent buffers).
        changed_tensors: tensors the delta changed (partially or fully trained).
        trained: trained entries in the delta.
        bytes: size of the weight file.
    """

    target: MergeTarget
    model: str
    dtype: str
    tensors: int
    changed_tensors: int
    trained: int
    bytes: int


def resolve_target(out: str | os.PathLike) -> MergeTarget:
    """A file, or a folder when ``out`` ends with a path separator or names an existing directory.

    The checks (clashes with inputs, ``--force``) are the command's :class:`~fps_cli.outputs.OutputPlan`, with
    :func:`folder_files` as the files of a folder.
    """
    text = os.fspath(out)
    path = Path(text)
    return MergeTarget(path, directory=text.endswith(("/", os.sep)) or path.is_dir())


def folder_files(hf: bool) -> tuple[str, ...]:
    """The files a merge writes into a folder: a transformers ``save_pretrained`` folder, or timm's two files."""
    return (CONFIG_NAME, WEIGHTS_NAME, HF_PROCESSOR_NAME) if hf else (WEIGHTS_NAME, CONFIG_NAME)


# ---------------------------------------------------------------------------------------------- the base


def check_base(model: nn.Module, delta: Delta, source: str = "the delta", base: str | None = None) -> None:
    """Check that ``model`` is the base ``delta`` was trained on: same parameter names and shapes, and the
    checksums training recorded (of the tensors the delta changes, and of every parameter but the head).

    Args:
        model: the candidate base.
        delta: the trained change.
        source: how to name the delta in messages.
        base: how to name the model in messages (default: its class name).

    Raises:
        FileFormatError: every shape mismatch at once, or the tensors whose checksum differs.
    """
    from .finetune import mismatch_message
    from .selector import base_digest

    base = base or type(model).__name__
    message = mismatch_message(source, delta.provenance, delta.shapes, model, base)
    if message:
        raise FileFormatError(message)
    prov = delta.provenance
    params = dict(model.named_parameters())
    touched = prov.get("touched_sha256")
    if touched and weights_digest((n, params[n]) for n in delta.indices) != touched:
        names = list(delta.indices)
        raise FileFormatError(
            f"{source} was trained on other base weights than {base}: the checksum of the {len(names)} tensors it "
            f"changes differs ({', '.join(names)}); {_WAY_OUT}"
        )
    recorded = prov.get("base_sha256")
    if recorded and base_digest(model) != recorded:
        changed = set(delta.indices) | set(delta.full)
        others = [n for n in params if n not in changed]
        raise FileFormatError(
            f"{source} was trained on other base weights than {base}: the tensors it changes match, but the "
            f"checksum of the other {len(others)} parameters (head excluded) differs; {_WAY_OUT}"
        )


def build_checked_base(delta: Delta, spec: ModelSpec | None = None, source: str = "the delta") -> nn.Module:
    """Rebuild the base ``delta`` records (or ``spec``), on the CPU, and check it with :func:`check_base`.

    Raises:
        FileFormatError: the model does not fit the delta or is not its base.
        ModelError: the model cannot be built or its weights loaded.
    """
    from .finetune import build_base, spec_from_provenance

    spec = spec or spec_from_provenance(delta.provenance)
    # build_base seeds and builds the model and lists shape problems; the checksums are checked here, so that a
    # wrong base names the tensors at fault.
    model = build_base(spec, delta.shapes, {**delta.provenance, "base_sha256": None}, source)
    check_base(model, delta, source, f"{spec.name} as loaded now")
    return model


# -------------------------------------------------------------------------------------------- the merge


def merge_state_dict(state: dict[str, Tensor], delta: Delta, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """Add ``delta`` to ``state`` one tensor at a time, in place, casting floating tensors to ``dtype``.

    Replacing each entry as it is merged lets the base tensor go as soon as nothing else holds it, so memory
    stays at one model plus one tensor. Tensors sharing storage (tied weights) are written as separate copies,
    which safetensors requires and ``load_state_dict`` accepts.

    Returns:
        ``state`` itself.

    Raises:
        FileFormatError: the delta names a tensor the state lacks, or the result holds NaN or infinite values
            (every such tensor named).
    """
    from .sparse import apply_delta

    missing = [n for n in [*delta.indices, *delta.full] if n not in state]
    if missing:
        raise FileFormatError(f"the delta changes tensors the model lacks: {', '.join(missing)}")
    seen, bad = set(), []
    for name in list(state):
        if name in delta.indices:
            one = apply_delta({name: state[name]}, {name: delta.indices[name]}, {name: delta.values[name]}, {})
        elif name in delta.full:
            one = apply_delta({name: state[name]}, {}, {}, {name: delta.full[name]})
        else:
            one = state
        t = one[name]
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        pointer = t.untyped_storage().data_ptr() if t.numel() else None
        if pointer in seen:
            t = t.clone()
        seen.add(pointer)
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad.append(name)
        state[name] = t
    if bad:
        raise FileFormatError(
            f"the merged weights hold NaN or infinite values in {len(bad)} tensors ({', '.join(bad)})"
            + ("; a float16 overflow? use --dtype bf16 or fp32" if dtype == torch.float16 else "")
        )
    return state


def merge_into(model: nn.Module, delta: Delta | str | os.PathLike) -> nn.Module:
    """Apply a delta to a model in place, after checking that it is the delta's base (shapes and checksums).

    Example:
        >>> model = merge_into(timm.create_model("vit_base_patch16_224.augreg_in21k", pretrained=True,
        ...                                      num_classes=200), "delta.safetensors")

    Returns:
        ``model``, now the fine-tuned model.

    Raises:
        FileFormatError: the model is not the delta's base, or the result is not finite.
    """
    source = str(delta) if not isinstance(delta, Delta) else "the delta"
    delta = delta if isinstance(delta, Delta) else read_delta(delta)
    check_base(model, delta, source)
    params = dict(model.named_parameters())
    merged = merge_state_dict({n: params[n].detach() for n in [*delta.indices, *delta.full]}, delta)
    with torch.no_grad():
        for name, value in merged.items():
            params[name].copy_(value)
    return model


def load_merged(delta: str | os.PathLike, spec: ModelSpec | None = None) -> nn.Module:
    """The fine-tuned model a delta file describes: its recorded base (or ``spec``), rebuilt, checked and merged.

    Example:
        >>> model = load_merged("delta.safetensors")  # a plain timm model, in eval mode
    """
    the_delta = read_delta(delta)
    model = build_checked_base(the_delta, spec, str(delta))
    params = dict(model.named_parameters())
    merged = merge_state_dict({n: params[n].detach() for n in [*the_delta.indices, *the_delta.full]}, the_delta)
    with torch.no_grad():
        for name, value in merged.items():
            params[name].copy_(value)
    return model.eval()


def timm_config(
    model: nn.Module, img_size: int | None, label_names: list[str] | None = None, *, pretrained_tag: bool = True
) -> str:
    """The ``config.json`` of a timm ``local-dir:`` folder for ``model``, as timm's exporter writes it, with the
    data config (input size) the model was trained at. ``pretrained_tag=False`` (a base built with
    ``--no-pretrained`` or from a ``--checkpoint``) drops the hub tag timm's default config carries: those weights
    did not come from it."""
    from timm.models._hub import save_config_for_hf

    from .data import transform_config

    if getattr(model, "pretrained_cfg", None) is None:
        raise FileFormatError(f"{type(model).__name__} is not a timm model; write a single file instead")
    model_config: dict[str, Any] = {"label_names": list(label_names)} if label_names else {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CONFIG_NAME
        save_config_for_hf(model, path, model_config=model_config, data_config=transform_config(model, img_size))
        if pretrained_tag:
            return path.read_text()
        config = json.loads(path.read_text())
        config.get("pretrained_cfg", {}).pop("tag", None)
        return json.dumps(config, indent=2) + "\n"


def _metadata(delta: Delta, dtype: str) -> dict[str, str]:
    prov = delta.provenance
    identity = ("model", "pretrained_tag", "checkpoint", "num_classes", "img_size", "mask_sha256")
    return {
        "format": "pt",  # what transformers / timm expect of a PyTorch state dict in safetensors
        "fps.created_by": f"fps_cli {__version__}",
        "fps.merged_from": json.dumps({k: prov.get(k) for k in identity}),
        "fps.dtype": json.dumps(dtype),
    }


def write_merged(
    target: MergeTarget,
    state: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    config: str,
    *,
    tx: Transaction | None = None,
    overwrite: bool = False,
) -> None:
    """Write the weights (and, for a folder, ``config.json``) through :mod:`.outputs`: a new folder appears whole,
    an existing one gets both files in one group commit, and nothing else in it is touched. Without ``tx``, an
    existing weight file is replaced only with ``overwrite=True``."""
    if tx is None:
        if not overwrite and Path(target.weights).exists():
            raise OutputExistsError(f"{target.weights} already exists; pass overwrite=True to replace it")
        with Transaction(replace=overwrite) as own:
            write_merged(target, state, metadata, config, tx=own)
        return
    if not target.directory:
        write_atomic(target.path, state, metadata, tx=tx)
        return

    def writer(staging: Path) -> None:
        (staging / CONFIG_NAME).write_text(config)
        write_atomic(staging / WEIGHTS_NAME, state, metadata, tx=None)

    tx.write_folder(target.path, writer)


def run_merge(
    delta: Delta,
    target: MergeTarget,
    *,
    spec: ModelSpec | None = None,
    dtype: str = "fp32",
    source: str = "the delta",
    tx: Transaction | None = None,
    overwrite: bool = False,
) -> MergeResult:
    """Rebuild the delta's base, check it, merge, and write ``target`` (check it with an
    :class:`~fps_cli.outputs.OutputPlan` first; ``tx``: the plan's transaction, default: one of its own, which
    replaces an existing output only with ``overwrite=True``).

    Args:
        delta: the trained change (:func:`.formats.read_delta`).
        target: a file or a ``local-dir:`` folder.
        spec: the base model; default: the one the delta records.
        dtype: ``fp32``, ``bf16`` or ``fp16`` for the written floating-point tensors.
        source: how to name the delta in messages.

    Raises:
        FileFormatError: the base does not fit the delta or is not the one it was trained on (the tensors named),
            or the merged weights are not finite. Nothing is written then.
        ModelError: the base model cannot be built.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {tuple(DTYPES)}")
    model = build_checked_base(delta, spec, source)
    name = spec.name if spec is not None else delta.provenance["model"]
    state = model.state_dict()
    if target.directory and is_hf_model(model):
        # A transformers save_pretrained folder needs the model's config and image processor: keep the model,
        # at the cost of one extra copy of the weights while merging.
        merge_state_dict(state, delta, DTYPES[dtype])
        labels = delta.provenance.get("classes") or None  # a language model has none
        replace = tx is not None or overwrite  # a plan's transaction was checked by the plan
        save_hf_pretrained(model, target.path, state_dict=state, labels=labels, force=replace, tx=tx)
    else:
        img_size = spec.img_size if spec is not None else delta.provenance.get("img_size")
        config = ""
        if target.directory:
            from_hub = bool(delta.provenance.get("pretrained"))  # False for --no-pretrained and --checkpoint bases
            config = timm_config(model, img_size, delta.provenance.get("classes"), pretrained_tag=from_hub)
        del model  # the state dict alone holds the base now, so each merged tensor frees the one it replaces
        merge_state_dict(state, delta, DTYPES[dtype])
        write_merged(target, state, _metadata(delta, dtype), config, tx=tx, overwrite=overwrite)
    return MergeResult(
        target=target,
        model=name,
        dtype=dtype,
        tensors=len(state),
        changed_tensors=len(delta.indices) + len(delta.full),
        trained=delta.trained,
        bytes=(tx.staged(target.weights) if tx is not None else target.weights).stat().st_size,
    )
