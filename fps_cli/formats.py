"""Where the file formats live: ``mask`` and ``scores`` safetensors files, format version 1 (DESIGN.md section 4).

Every file is a plain safetensors file. Its header metadata (string -> string) holds:

- ``fps.format``: ``mask`` or ``scores``; ``fps.format_version``: ``1``; ``fps.created_by``: ``fps_cli X.Y.Z``;
- every other ``fps.<key>`` is a JSON value: the provenance (model, data, method, budget, ...), the shapes of all
  the model's parameters (``fps.param_shapes``) and, in a mask, the fully trainable parameters
  (``fps.fully_trainable``).

Tensors:

- mask: one tensor per partially selected parameter, named after it, holding the sorted flat (row-major)
  indices of its selected entries (int32, or int64 past 2**31 entries).
- scores, ``fps.statistic = "input"`` (fps, weight, activation, random): per candidate layer
  ``<weight name>::abs_sum`` and ``<weight name>::sq_sum`` (fp64, shaped like the layer's input statistic) and
  ``<weight name>::count`` (int64, one element).
- scores, ``fps.statistic = "gradient"`` (gps): per candidate layer ``<weight name>::grad_sum``, the dense summed
  gradient (fp32, shaped like the weight).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from . import __version__
from .activations import InputStats
from .errors import FileFormatError
from .headers import FORMAT_VERSION, check_header, count_params, count_selected, read_mask_arrays
from .headers import FORMATS as FORMATS
from .headers import RESERVED as _RESERVED
from .headers import shapes_and_names as _shapes_and_names

if TYPE_CHECKING:
    from .outputs import Transaction


def write_atomic(
    path: str | os.PathLike,
    tensors: Mapping[str, Tensor],
    metadata: Mapping[str, str],
    *,
    tx: Transaction | None = None,
    overwrite: bool = False,
) -> None:
    """Write a safetensors file through :mod:`.outputs`: to a recognisable temporary name, fsynced, then renamed.

    A reader never sees a half-written file, and a file memory-mapped from ``path`` is never written over.

    Args:
        tx: the group commit the file belongs to (its rules: no replacing without ``--force``, all-or-nothing);
            default: a commit of its own (the library's ``save_*`` functions).
        overwrite: without ``tx``, replace an existing ``path`` (like the command line's ``--force``).

    Raises:
        OutputExistsError: ``path`` exists, and neither ``overwrite`` nor ``tx`` allows replacing it.
    """
    from safetensors.torch import save_file

    from .outputs import Transaction

    def writer(tmp: Path) -> None:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=dict(metadata))
        _canonical_header(tmp)

    if tx is not None:
        tx.write(path, writer)
        return
    if not overwrite and Path(path).exists():
        from .errors import OutputExistsError

        raise OutputExistsError(f"{path} already exists; pass overwrite=True to replace it")
    with Transaction(replace=overwrite) as own:
        own.write(path, writer)


def _canonical_header(path: str | os.PathLike) -> None:
    """Rewrite a safetensors header in place with sorted keys, so equal inputs give byte-identical files.

    safetensors serialises the header from a hash map, so its key order (and the file's bytes) changes from one
    process to the next. The sorted header has the same length, so the tensor data does not move.
    """
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
        if len(canonical) > size:  # cannot happen for a header safetensors wrote itself; keep the file as it is
            return
        f.seek(8)
        f.write(canonical + b" " * (size - len(canonical)))


def encode_metadata(kind: str, provenance: Mapping[str, Any]) -> dict[str, str]:
    """Header metadata: the three reserved keys as plain strings, everything else as JSON."""
    meta = {
        "fps.format": kind,
        "fps.format_version": str(FORMAT_VERSION),
        "fps.created_by": f"fps_cli {__version__}",
    }
    for key, value in provenance.items():
        if key in _RESERVED:
            raise ValueError(f"provenance key {key!r} is reserved")
        meta[f"fps.{key}"] = json.dumps(value)
    return meta


def read_header(path: str | os.PathLike, kind: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """Read and check the header of an fps file of the given kind, without loading its tensors.

    Args:
        path: the file.
        kind: ``mask``, ``scores`` or ``delta``; ``None`` accepts any of them (``raw["fps.format"]`` says which).

    Returns:
        (provenance decoded from JSON, the raw header metadata).

    Raises:
        FileFormatError: missing, unreadable, truncated, not an fps file, another kind, or a newer version.
    """
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    from .outputs import recover

    path = Path(path)
    recover(path)  # a group commit killed half-way reads as all old (outputs.py)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return check_header(path, raw, kind), raw


def read_fps_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, Tensor], dict[str, Any], dict[str, str]]:
    """Read and check an fps file of the given kind (see :func:`read_header`).

    Returns:
        (tensors, provenance decoded from JSON, the raw header metadata).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    provenance, raw = read_header(path, kind)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return tensors, provenance, raw


def weights_digest(named_tensors: Iterable[tuple[str, Tensor]]) -> str:
    """SHA-256 over names, dtypes, shapes and bytes: identifies the exact weights a file was made from."""
    h = hashlib.sha256()
    for name, t in named_tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():  # an empty tensor has no bytes (and viewing it as bytes fails on its stride)
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------- mask


@dataclass
class Mask:
    """A selection: which entries of which parameters are trainable.

    Attributes:
        indices: parameter name -> sorted flat indices of its selected entries (int64).
        fully_trainable: parameters trained in full.
        shapes: every parameter's shape (the whole model).
        provenance: how the mask was made (model, data, method, budget, ...).
    """

    indices: dict[str, Tensor]
    fully_trainable: list[str]
    shapes: dict[str, tuple[int, ...]]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def selected(self) -> int:
        return count_selected(self.indices)

    @property
    def trainable(self) -> int:
        return self.selected + count_params(self.shapes, self.fully_trainable)

    @property
    def total_params(self) -> int:
        return count_params(self.shapes)

    def dense(self) -> dict[str, Tensor]:
        """Every parameter as a boolean tensor shaped like it, True where trainable."""
        out = {}
        for name, shape in self.shapes.items():
            if name in self.fully_trainable:
                out[name] = torch.ones(shape, dtype=torch.bool)
                continue
            m = torch.zeros(_numel(shape), dtype=torch.bool)
            if name in self.indices:
                m[self.indices[name]] = True
            out[name] = m.reshape(shape)
        return out


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def save_mask(path: str | os.PathLike, mask: Mask, *, tx: Transaction | None = None, overwrite: bool = False) -> None:
    """Write ``mask`` to ``path`` atomically (``tx``: as part of a group commit, see :func:`write_atomic`); an
    existing file is replaced only with ``overwrite=True``."""
    tensors = {}
    for name, idx in mask.indices.items():
        if idx.numel() == 0:  # selects nothing: written as absent (and read so, see headers.read_mask_arrays)
            continue
        dtype = torch.int32 if _numel(mask.shapes[name]) <= 2**31 - 1 else torch.int64
        tensors[name] = idx.to(dtype)
    provenance = {
        **mask.provenance,
        "param_shapes": {k: list(v) for k, v in mask.shapes.items()},
        "fully_trainable": list(mask.fully_trainable),
        "selected": mask.selected,
        "trainable": mask.trainable,
        "total_params": mask.total_params,
    }
    write_atomic(path, tensors, encode_metadata("mask", provenance), tx=tx, overwrite=overwrite)


def read_mask(path: str | os.PathLike) -> Mask:
    """Read and validate a mask file (:func:`.headers.read_mask_arrays`, as torch tensors)."""
    arrays = read_mask_arrays(path)
    indices = {name: torch.from_numpy(idx) for name, idx in arrays.indices.items()}
    return Mask(indices, arrays.fully_trainable, arrays.shapes, arrays.provenance)


def load_mask(path: str | os.PathLike) -> dict[str, Tensor]:
    """Load a mask file as dense boolean tensors, one per model parameter, True where trainable.

    Example:
        >>> mask = load_mask("mask.safetensors")
        >>> mask["blocks.0.attn.qkv.weight"].sum()
    """
    return read_mask(path).dense()


# --------------------------------------------------------------------------------------------------- scores


SCORE_STATISTICS = ("input", "gradient")


def save_scores(
    path: str | os.PathLike,
    stats: Mapping[str, InputStats],
    provenance: Mapping[str, Any],
    *,
    tx: Transaction | None = None,
    overwrite: bool = False,
) -> None:
    """Write per-layer input statistics (the score file of activation-based methods) atomically (an existing file
    only with ``overwrite=True``)."""
    tensors = {}
    for name, s in stats.items():
        tensors[f"{name}::abs_sum"] = s.abs_sum.double()
        tensors[f"{name}::sq_sum"] = s.sq_sum.double()
        tensors[f"{name}::count"] = torch.tensor([s.count], dtype=torch.int64)
    metadata = encode_metadata("scores", {**provenance, "statistic": "input"})
    write_atomic(path, tensors, metadata, tx=tx, overwrite=overwrite)


def save_gradient_scores(
    path: str | os.PathLike,
    gradients: Mapping[str, Tensor],
    provenance: Mapping[str, Any],
    *,
    tx: Transaction | None = None,
    overwrite: bool = False,
) -> None:
    """Write per-layer summed gradients (the score file of ``gps``) atomically, dense fp32 (an existing file only
    with ``overwrite=True``)."""
    tensors = {f"{name}::grad_sum": g.float() for name, g in gradients.items()}
    metadata = encode_metadata("scores", {**provenance, "statistic": "gradient"})
    write_atomic(path, tensors, metadata, tx=tx, overwrite=overwrite)


def score_statistic(path: str | os.PathLike) -> str:
    """What a score file holds, from its header alone: ``input`` statistics or summed gradients (``gradient``).

    Raises:
        FileFormatError: not a readable fps score file, or a statistic this version does not know.
    """
    provenance, _ = read_header(path, "scores")
    statistic = provenance.get("statistic")
    if statistic not in SCORE_STATISTICS:
        raise FileFormatError(f"{path}: score statistic {statistic!r} is not supported by this version")
    return statistic


def _read_score_file(path: str | os.PathLike, statistic: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors, prov, _ = read_fps_file(path, "scores")
    found = prov.get("statistic")
    if found not in SCORE_STATISTICS:
        raise FileFormatError(f"{path}: score statistic {found!r} is not supported by this version")
    if found != statistic:
        what = {"input": "input statistics (fps, weight, activation, random)", "gradient": "gradients (gps)"}
        raise FileFormatError(f"{path} holds {what[found]}, but {what[statistic]} are needed here")
    return tensors, prov


def read_gradient_scores(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a score file of summed gradients written by :func:`save_gradient_scores`."""
    tensors, prov = _read_score_file(path, "gradient")
    gradients, problems = {}, []
    for key, value in tensors.items():
        name, _, kind = key.rpartition("::")
        if kind != "grad_sum" or not name:
            problems.append(f"unexpected tensor {key!r}")
        elif not value.is_floating_point():
            problems.append(f"{key}: gradients must be floating point, got {value.dtype}")
        elif not bool(torch.isfinite(value).all()):
            problems.append(f"{key} holds NaN or infinite values")
        else:
            gradients[name] = value.float()
    if problems:
        raise FileFormatError(f"{path} is not a valid gradient score file:\n  " + "\n  ".join(problems))
    return gradients, prov


def read_scores(path: str | os.PathLike) -> tuple[dict[str, InputStats], dict[str, Any]]:
    """Read a score file of input statistics written by :func:`save_scores`."""
    tensors, prov = _read_score_file(path, "input")
    stats, problems = {}, []
    names = {k.rsplit("::", 1)[0] for k in tensors}
    for name in sorted(names):
        try:
            abs_sum, sq_sum = tensors[f"{name}::abs_sum"], tensors[f"{name}::sq_sum"]
            count_tensor = tensors[f"{name}::count"]
        except KeyError:
            raise FileFormatError(f"{path}: incomplete statistics for {name!r}") from None
        if count_tensor.numel() != 1 or count_tensor.is_floating_point() or count_tensor.dtype == torch.bool:
            problems.append(f"{name}::count must be one integer, got {count_tensor.dtype} {list(count_tensor.shape)}")
            continue
        count = int(count_tensor.reshape(-1)[0])
        if count <= 0:
            problems.append(f"{name}::count must be positive, got {count}")
        for key, t in (("abs_sum", abs_sum), ("sq_sum", sq_sum)):
            if not t.is_floating_point():
                problems.append(f"{name}::{key} must be floating point, got {t.dtype}")
            elif not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                problems.append(f"{name}::{key} holds NaN, infinite or negative values")
        stats[name] = InputStats(abs_sum, sq_sum, count)
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise FileFormatError(f"{path} is not a valid score file: {shown}")
    return stats, prov


# ---------------------------------------------------------------------------------------------------- delta


@dataclass
class Delta:
    """A fine-tuned change to a base model (format ``delta``, DESIGN.md section 4).

    Attributes:
        indices: partially trained parameter name -> sorted flat indices of its trained entries (int64).
        values: partially trained parameter name -> the change at those entries (fp32, same length).
        full: fully trained parameter name -> its new value.
        shapes: every parameter's shape (the whole model).
        provenance: base model identity, base checksums, training configuration and final metrics.

    On disk: ``<name>::indices`` (int32, or int64 past 2**31 entries) and ``<name>::values`` (fp32) per
    partially trained parameter, ``<name>`` per fully trained parameter.
    """

    indices: dict[str, Tensor]
    values: dict[str, Tensor]
    full: dict[str, Tensor]
    shapes: dict[str, tuple[int, ...]]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def trained(self) -> int:
        return sum(int(v.numel()) for v in self.values.values()) + sum(int(t.numel()) for t in self.full.values())


def save_delta(
    path: str | os.PathLike, delta: Delta, *, tx: Transaction | None = None, overwrite: bool = False
) -> None:
    """Write ``delta`` to ``path`` atomically (``tx``: as part of a group commit, see :func:`write_atomic`); an
    existing file is replaced only with ``overwrite=True``."""
    tensors = {}
    for name, idx in delta.indices.items():
        if idx.numel() == 0:  # trains nothing: written as absent (and read so, see read_delta)
            continue
        dtype = torch.int32 if _numel(delta.shapes[name]) <= 2**31 - 1 else torch.int64
        tensors[f"{name}::indices"] = idx.to(dtype)
        tensors[f"{name}::values"] = delta.values[name].float()
    tensors.update(delta.full)
    provenance = {
        **delta.provenance,
        "param_shapes": {k: list(v) for k, v in delta.shapes.items()},
        "fully_trained": list(delta.full),
        "trained": delta.trained,
    }
    write_atomic(path, tensors, encode_metadata("delta", provenance), tx=tx, overwrite=overwrite)


def read_delta(path: str | os.PathLike) -> Delta:
    """Read and validate a delta file (every problem reported at once)."""
    tensors, prov, _ = read_fps_file(path, "delta")
    shapes, fully = _shapes_and_names(prov, path, "fully_trained")
    prov.pop("trained", None)
    problems, indices, values, full = [], {}, {}, {}
    partial = sorted({k.rsplit("::", 1)[0] for k in tensors if "::" in k})
    for name in partial:
        idx, val = tensors.get(f"{name}::indices"), tensors.get(f"{name}::values")
        if name not in shapes:
            problems.append(f"{name!r} is not a parameter of the model")
        elif idx is None or val is None:
            problems.append(f"{name!r} needs both ::indices and ::values")
        elif idx.dtype not in (torch.int32, torch.int64) or idx.dim() != 1 or val.dtype != torch.float32:
            problems.append(f"{name!r}: ::indices must be 1-D int32/int64 and ::values fp32")
        elif val.shape != idx.shape:
            problems.append(f"{name!r}: {val.numel()} values for {idx.numel()} indices")
        else:
            idx, n = idx.long(), _numel(shapes[name])
            if idx.numel() == 0:  # trains nothing: the parameter is the base's, exactly as if the pair were absent
                continue
            if int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all()):
                problems.append(f"indices of {name!r} must be sorted, unique and within [0, {n})")
            indices[name], values[name] = idx, val
    for name in fully:
        value = tensors.get(name)
        if value is None:
            problems.append(f"fully trained parameter {name!r} has no tensor")
        elif name not in shapes or tuple(value.shape) != shapes[name]:
            problems.append(f"fully trained {name!r} {list(value.shape)} does not fit the recorded shapes")
        else:
            full[name] = value
    stray = [k for k in tensors if "::" not in k and k not in fully]
    problems += [f"tensor {k!r} is neither a delta nor listed in fps.fully_trained" for k in stray]
    if problems:
        raise FileFormatError(f"{path} is not a valid delta file: " + "; ".join(problems))
    return Delta(indices, values, full, shapes, prov)
