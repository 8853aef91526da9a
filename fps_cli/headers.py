"""fps file headers and mask indices read without torch: ``fps inspect`` needs no more than safetensors' own
numpy reader, so it never pays torch's import (seconds on a cold start).

:mod:`.formats` holds the formats themselves and delegates its header checks here, so both read a header the
same way and fail with the same messages.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from . import __version__
from .errors import FileFormatError

FORMAT_VERSION = 1
FORMATS = ("mask", "scores", "delta")
RESERVED = ("format", "format_version", "created_by")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and v == v and abs(v) != float("inf")


def _optional(check: Any) -> Any:
    return lambda v: v is None or check(v)


def _is_str(v: Any) -> bool:
    return isinstance(v, str)


def _is_shapes(v: Any) -> bool:
    if not isinstance(v, dict):
        return False
    sizes = (s for shape in v.values() for s in (shape if isinstance(shape, list) else [None]))
    return all(_is_int(s) and s >= 0 for s in sizes)


def _is_names(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(n, str) for n in v)


# The type of every header value that fps reads back (checked on read, so a wrong type is one clear line, never a
# crash deep inside the model code): key -> (check, how to say it).
_HEADER_TYPES: dict[str, tuple[Any, str]] = {
    "model": (_is_str, "a string"),
    "pretrained": (lambda v: isinstance(v, bool), "true or false"),
    "pretrained_tag": (_optional(_is_str), "a string or null"),
    "checkpoint": (_optional(_is_str), "a string or null"),
    "init_seed": (_optional(_is_int), "an integer or null"),
    "num_classes": (_optional(lambda v: _is_int(v) and v > 0), "a positive integer or null"),
    "img_size": (_optional(lambda v: _is_int(v) and v > 0), "a positive integer or null"),
    "data": (_optional(_is_str), "a string or null"),
    "classes": (_optional(_is_names), "a list of strings or null"),
    "method": (_optional(_is_str), "a string or null"),
    "norm": (_optional(_is_str), "a string or null"),
    "granularity": (_optional(_is_str), "a string or null"),
    "statistic": (_is_str, "a string"),
    "budget": (_optional(_is_number), "a number or null"),
    "topk_per_neuron": (_optional(_is_int), "an integer or null"),
    "num_samples": (_optional(_is_int), "an integer or null"),
    "base_sha256": (_optional(_is_str), "a string or null"),
    "touched_sha256": (_optional(_is_str), "a string or null"),
    "mask_sha256": (_optional(_is_str), "a string or null"),
    "param_shapes": (_is_shapes, "an object of name -> list of sizes"),
    "fully_trainable": (_is_names, "a list of parameter names"),
    "fully_trained": (_is_names, "a list of parameter names"),
    "selection": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "train_config": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
    "metrics": (_optional(lambda v: isinstance(v, dict)), "an object or null"),
}


def raw_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header metadata of a safetensors file, read from its first bytes (no tensor is loaded).

    Raises:
        FileFormatError: missing, unreadable, or not a safetensors file (truncated or corrupt).
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path} does not exist")
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if size <= 0 or size > min(path.stat().st_size - 8, 100_000_000):
                raise ValueError(f"header size {size} does not fit a file of {path.stat().st_size} bytes")
            header = json.loads(f.read(size))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metadata = header.get("__metadata__") or {}
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    return {str(k): str(v) for k, v in metadata.items()}


def check_header(path: str | os.PathLike, raw: dict[str, str], kind: str | None) -> dict[str, Any]:
    """Check an fps header of the given kind (``None``: any kind) and decode its provenance from JSON.

    Raises:
        FileFormatError: not an fps file, another kind, a newer version, or a provenance entry that is not JSON.
    """
    found = raw.get("fps.format")
    if found is None:
        raise FileFormatError(f"{path} is a safetensors file but not an fps file (no fps.format in its header)")
    if kind is None and found not in FORMATS:
        raise FileFormatError(f"{path} is an fps {found!r} file, which this fps_cli {__version__} does not read")
    if kind is not None and found != kind:
        raise FileFormatError(f"{path} is an fps {found} file, but a {kind} file is needed here")
    version = raw.get("fps.format_version", "")
    if not (version.isascii() and version.isdigit()) or not 1 <= int(version) <= FORMAT_VERSION:
        newer = version.isascii() and version.isdigit() and int(version) > FORMAT_VERSION
        raise FileFormatError(
            f"{path} has format version {version!r}; this fps_cli {__version__} reads version {FORMAT_VERSION}"
            + (": upgrade fps-cli" if newer else "")
        )
    provenance = {}
    for key, value in raw.items():
        if key.startswith("fps.") and key[4:] not in RESERVED:
            try:
                provenance[key[4:]] = json.loads(value)
            except json.JSONDecodeError:
                raise FileFormatError(f"{path}: header entry {key} is not valid JSON") from None
    wrong = [
        f"fps.{key} must be {_HEADER_TYPES[key][1]}, got {json.dumps(value)}"
        for key, value in provenance.items()
        if key in _HEADER_TYPES and not _HEADER_TYPES[key][0](value)
    ]
    if wrong:
        raise FileFormatError(f"{path} has header values of the wrong type: " + "; ".join(wrong))
    return provenance


def read_header(path: str | os.PathLike, kind: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(provenance, raw metadata) of an fps file, checked (see :func:`check_header`), without torch."""
    from .outputs import recover

    recover(path)  # a group commit killed half-way reads as all old (outputs.py)
    raw = raw_metadata(path)
    return check_header(path, raw, kind), raw


class MaskArrays:
    """A mask file's content as numpy arrays: the same fields as :class:`fps_cli.formats.Mask`, no torch.

    Attributes:
        indices: parameter name -> sorted flat indices of its selected entries (int64).
        fully_trainable: parameters trained in full.
        shapes: every parameter's shape (the whole model), in model order.
        provenance: how the mask was made.
    """

    def __init__(self, indices: dict[str, Any], fully_trainable: list[str], shapes: dict, provenance: dict) -> None:
        self.indices, self.fully_trainable, self.shapes, self.provenance = indices, fully_trainable, shapes, provenance

    @property
    def selected(self) -> int:
        return count_selected(self.indices)

    @property
    def trainable(self) -> int:
        return self.selected + count_params(self.shapes, self.fully_trainable)

    @property
    def total_params(self) -> int:
        return count_params(self.shapes)


def count_selected(indices: dict[str, Any]) -> int:
    """Selected entries of a mask's indices (numpy arrays or torch tensors)."""
    return sum(_numel(i.shape) for i in indices.values())


def count_params(shapes: dict[str, Any], names: Any = None) -> int:
    """Elements of the parameters ``names`` (default: all) given their shapes."""
    return sum(_numel(shapes[n]) for n in (shapes if names is None else names))


def _numel(shape: Any) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def shapes_and_names(prov: dict[str, Any], path: str | os.PathLike, names_key: str) -> tuple[dict, list[str]]:
    """Pop ``param_shapes`` and a list of parameter names from a mask's or delta's provenance."""
    try:
        shapes = {k: tuple(int(d) for d in v) for k, v in prov.pop("param_shapes").items()}
        names = list(prov.pop(names_key))
    except (KeyError, AttributeError, TypeError, ValueError):
        raise FileFormatError(f"{path}: header lacks valid fps.param_shapes / fps.{names_key}") from None
    return shapes, names


def read_mask_arrays(path: str | os.PathLike) -> MaskArrays:
    """Read and validate a mask file with safetensors' numpy reader.

    Raises:
        FileFormatError: not a readable mask, or indices that are not sorted, unique, in range, 1-D integers.
    """
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    prov, _ = read_header(path, "mask")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise FileFormatError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None
    shapes, fully = shapes_and_names(prov, path, "fully_trainable")
    for key in ("selected", "trainable", "total_params"):
        prov.pop(key, None)
    problems = [f"fully trainable parameter {n!r} is not in the model" for n in fully if n not in shapes]
    indices = {}
    for name, idx in tensors.items():
        if name not in shapes:
            problems.append(f"tensor {name!r} is not a parameter of the model")
            continue
        if idx.dtype not in (np.int32, np.int64) or idx.ndim != 1:
            problems.append(f"tensor {name!r} must be 1-D int32/int64 indices, got {idx.dtype} {list(idx.shape)}")
            continue
        if idx.size == 0:  # selects nothing: the parameter is frozen, exactly as if the tensor were absent
            continue
        idx = idx.astype(np.int64)
        n = _numel(shapes[name])
        if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all())):
            problems.append(f"indices of {name!r} must be sorted, unique and within [0, {n})")
            continue
        indices[name] = idx
    if problems:
        raise FileFormatError(f"{path} is not a valid mask:\n  " + "\n  ".join(problems))
    return MaskArrays(indices, fully, shapes, prov)
