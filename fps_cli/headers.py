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
    if not version.isdigit() or int(version) > FORMAT_VERSION:
        raise FileFormatError(
            f"{path} has format version {version!r}; this fps_cli {__version__} reads version {FORMAT_VERSION}: "
            "upgrade fps-cli"
        )
    provenance = {}
    for key, value in raw.items():
        if key.startswith("fps.") and key[4:] not in RESERVED:
            try:
                provenance[key[4:]] = json.loads(value)
            except json.JSONDecodeError:
                raise FileFormatError(f"{path}: header entry {key} is not valid JSON") from None
    return provenance


def read_header(path: str | os.PathLike, kind: str | None) -> tuple[dict[str, Any], dict[str, str]]:
    """(provenance, raw metadata) of an fps file, checked (see :func:`check_header`), without torch."""
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
        return sum(int(i.size) for i in self.indices.values())

    @property
    def trainable(self) -> int:
        return self.selected + sum(_numel(self.shapes[n]) for n in self.fully_trainable)

    @property
    def total_params(self) -> int:
        return sum(_numel(s) for s in self.shapes.values())


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
        idx = idx.astype(np.int64)
        n = _numel(shapes[name])
        if idx.size and (int(idx[0]) < 0 or int(idx[-1]) >= n or not bool((idx[1:] > idx[:-1]).all())):
            problems.append(f"indices of {name!r} must be sorted, unique and within [0, {n})")
            continue
        indices[name] = idx
    if problems:
        raise FileFormatError(f"{path} is not a valid mask:\n  " + "\n  ".join(problems))
    return MaskArrays(indices, fully, shapes, prov)
