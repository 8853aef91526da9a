"""``fps inspect`` as library calls: what a mask, score or delta file holds, as JSON-ready numbers.

Every function returns plain dicts and lists (numbers, strings), the same ones ``fps inspect --json`` prints;
:mod:`.views` draws them as text or as a matplotlib figure. The kind of a file is read from its header
(``fps.format``, and ``fps.statistic`` for a score file), never guessed from its name.

Masks are read with safetensors' numpy reader (:mod:`.headers`): ``fps inspect`` on masks never imports torch;
score files and deltas, and comparing two masks, import it when needed.

The per-depth view groups parameters by block and layer type. Those come from parameter names and shapes
(:func:`block_of`, :func:`layer_type`): this is a display, and name parsing is good enough for one (selection
itself never looks at names).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .headers import MaskArrays, read_header, read_mask_arrays

if TYPE_CHECKING:
    from torch import Tensor

    from .formats import Delta, Mask

if TYPE_CHECKING:
    from .outputs import Transaction

LAYER_TYPES = ("qkv", "proj", "fc1", "fc2", "conv", "other")
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
# Module containers whose numbered children are blocks: timm's blocks / layers / stages, ResNet's layer1..4,
# Hugging Face's encoder.layer.
_CONTAINER = re.compile(r"^(blocks|layers?|stages|resblocks|features|layer\d+|stage\d+|block\d+)$")
_QKV = {"qkv", "q", "k", "v", "kv", "q_proj", "k_proj", "v_proj", "qkv_proj", "query", "key", "value", "in_proj"}
_PROJ = {"proj", "out_proj", "o_proj", "c_proj"}
_FC1 = {"fc1", "up_proj", "gate_proj", "w1", "w12", "intermediate"}
_FC2 = {"fc2", "down_proj", "w2", "w3"}


def file_kind(path: str | os.PathLike) -> str:
    """``mask``, ``scores`` or ``delta``, from the file's header alone.

    Raises:
        FileFormatError: missing, unreadable, truncated, foreign or newer-version file.
    """
    _, raw = read_header(path, None)
    return raw["fps.format"]


# ------------------------------------------------------------------------------------ names -> depth, type


def block_of(name: str) -> str | None:
    """The block a parameter belongs to (``blocks.3``, ``layers.1.blocks.0``, ``layer2.1``), or None.

    The block is the deepest numbered child of a block container (``blocks``, ``layers``, ``stages``,
    ``layer1`` ...) on the parameter's path.
    """
    parts = name.split(".")
    found = None
    for i in range(1, len(parts) - 1):
        if parts[i].isdigit() and _CONTAINER.match(parts[i - 1]):
            found = i
    return ".".join(parts[: found + 1]) if found is not None else None


def layer_type(name: str, shape: Iterable[int]) -> str:
    """``qkv``, ``proj`` (attention output), ``fc1``, ``fc2`` (MLP), ``conv`` or ``other``, from name and shape.

    A ``weight`` of three or more dimensions is a convolution's (a 3-D position embedding is not).
    """
    parts = name.lower().split(".")
    attr, parts = parts[-1], parts[:-1]  # the module path, without weight / bias
    leaf = parts[-1] if parts else ""
    if (attr == "weight" and len(tuple(shape)) >= 3) or "conv" in leaf:
        return "conv"
    if leaf in _QKV:
        return "qkv"
    in_attention = any("attn" in p or "attention" in p for p in parts)
    if (leaf in _PROJ and in_attention) or (in_attention and leaf == "dense" and "output" in parts):
        return "proj"
    if leaf in _FC1 or (leaf == "dense" and "intermediate" in parts):
        return "fc1"
    if leaf in _FC2 or (leaf == "dense" and "output" in parts):
        return "fc2"
    return "other"


def layer_types(shapes: Mapping[str, Iterable[int]]) -> dict[str, str]:
    """:func:`layer_type` of every parameter; a bias is typed by its layer's weight (a conv's bias is ``conv``)."""
    types = {}
    for name, shape in shapes.items():
        module, _, attr = name.rpartition(".")
        sibling = f"{module}.weight" if module else "weight"
        if attr == "bias" and sibling in shapes:
            types[name] = layer_type(sibling, shapes[sibling])
        else:
            types[name] = layer_type(name, shape)
    return types


def natural_key(name: str) -> list[tuple[int, int | str]]:
    """Sort key that puts ``blocks.2`` before ``blocks.10``."""
    return [(0, int(p)) if p.isdigit() else (1, p) for p in name.split(".")]


def depth_keys(names: Iterable[str]) -> dict[str, str]:
    """Every parameter's row in the per-depth view: ``"0"``, ``"1"`` ... for blocks in model order, ``stem``
    for parameters before the first block, ``top`` for the others (final norm, head)."""
    rows: dict[str, str] = {}
    order: dict[str, int] = {}
    for name in names:
        block = block_of(name)
        if block is None:
            rows[name] = "top" if order else "stem"
        else:
            rows[name] = str(order.setdefault(block, len(order)))
    return rows


# ------------------------------------------------------------------------------------------------ masks


def _numel(shape: Iterable[int]) -> int:
    return math.prod(shape)


def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole else 0.0


def mask_report(mask: Mask | MaskArrays, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Totals, one row per parameter (in model order), the per-depth view and the per-neuron distribution.

    The rows add up to the totals: ``sum(selected) == totals.selected``, ``sum(trainable) == totals.trainable``,
    ``sum(numel) == totals.total_params``.
    """
    fully = set(mask.fully_trainable)
    depth = depth_keys(mask.shapes)
    types = layer_types(mask.shapes)
    layers = []
    for name, shape in mask.shapes.items():
        numel = _numel(shape)
        selected = int(np.asarray(mask.indices[name]).size) if name in mask.indices else 0
        trainable = numel if name in fully else selected
        role = "full" if name in fully else "selected" if name in mask.indices else "frozen"
        layers.append(
            {
                "name": name,
                "shape": list(shape),
                "numel": numel,
                "role": role,
                "selected": selected,
                "trainable": trainable,
                "pct": _pct(trainable, numel),
                "block": depth[name],
                "type": types[name],
            }
        )
    total = mask.total_params
    selected, trainable = mask.selected, mask.trainable
    totals = {
        "selected": selected,
        "fully_trainable": trainable - selected,
        "fully_trainable_tensors": len(fully),
        "trainable": trainable,
        "frozen": total - trainable,
        "total_params": total,
        "selected_layers": len(mask.indices),
        "selected_pct": _pct(selected, total),
        "trainable_pct": _pct(trainable, total),
    }
    return {
        "kind": "mask",
        "file": str(path) if path is not None else None,
        "provenance": dict(mask.provenance),
        "totals": totals,
        "layers": layers,
        "depth": depth_view(layers),
        "per_neuron": per_neuron(mask),
        "columns": column_view(mask),
    }


def depth_view(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Selected entries per block (rows, model order) and layer type (columns), with the parameters there."""
    rows: dict[str, dict[str, Any]] = {}
    for layer in layers:
        row = rows.setdefault(
            layer["block"],
            {"block": layer["block"], "selected": 0, "params": 0, "by_type": {t: [0, 0] for t in LAYER_TYPES}},
        )
        row["selected"] += layer["selected"]
        row["params"] += layer["numel"]
        cell = row["by_type"][layer["type"]]
        cell[0] += layer["selected"]
        cell[1] += layer["numel"]
    ordered = [rows[k] for k in ("stem",) if k in rows]
    ordered += [r for k, r in rows.items() if k not in ("stem", "top")]
    ordered += [rows[k] for k in ("top",) if k in rows]
    for row in ordered:
        row["pct"] = _pct(row["selected"], row["params"])
        row["by_type"] = {
            t: {"selected": s, "params": p, "pct": _pct(s, p)} for t, (s, p) in row["by_type"].items() if p
        }
    return {"types": list(LAYER_TYPES), "rows": ordered}


def per_neuron(mask: Mask | MaskArrays) -> dict[str, Any]:
    """How many entries each output neuron (row) of the partially selected parameters has selected."""
    counts = []
    for name, idx in mask.indices.items():
        shape = mask.shapes[name]
        rows = shape[0] if shape else 1
        per_row = _numel(shape) // rows if rows else 1
        counts.append(np.bincount(np.asarray(idx, dtype=np.int64) // per_row, minlength=rows))
    if not counts:
        return {"rows": 0, "min": 0, "max": 0, "mean": 0.0, "histogram": []}
    c = np.concatenate(counts)  # [rows of every partially selected parameter]
    hist = np.bincount(c)
    return {
        "rows": int(c.size),
        "min": int(c.min()),
        "max": int(c.max()),
        "mean": float(c.astype(np.float64).mean()),
        "histogram": [[k, int(n)] for k, n in enumerate(hist.tolist()) if n],
    }


# The "top columns" of a layer: this fraction of its input columns, those that receive the most selections.
TOP_COLUMNS = 0.1


def column_counts(idx: Any, shape: Iterable[int]) -> np.ndarray:
    """Selected entries per input column (per input of a neuron: a Linear's input feature, a conv's
    input channel x kernel tap) of one parameter, from its sorted flat indices (numpy or torch)."""
    shape = tuple(shape)
    row_len = _numel(shape[1:]) if len(shape) > 1 else 1
    return np.bincount(np.asarray(idx, dtype=np.int64) % row_len, minlength=row_len)  # [row_len]


def concentration(counts: np.ndarray, top: int = 3) -> dict[str, Any]:
    """How concentrated one layer's selections are over its input columns.

    ``distinct``: columns with at least one selected entry; ``top_share``: the share of the selected entries that
    fall in the :data:`TOP_COLUMNS` most-selected columns (``TOP_COLUMNS`` itself when spread evenly, 1.0 when
    every selection sits there); ``top``: the ``top`` most-selected columns as ``[column, entries]``.
    """
    inputs, selected = int(counts.size), int(counts.sum())
    k = max(1, round(TOP_COLUMNS * inputs))
    order = np.argsort(-counts, kind="stable")  # most-selected first, lower column first among equals
    return {
        "inputs": inputs,
        "distinct": int((counts > 0).sum()),
        "distinct_pct": _pct(int((counts > 0).sum()), inputs),
        "top_share": float(counts[order[:k]].sum()) / selected if selected else 0.0,
        "top": [[int(c), int(counts[c])] for c in order[:top] if counts[c]],
    }


def column_view(mask: Mask | MaskArrays) -> dict[str, Any]:
    """Per partially selected layer, how its selections spread over input columns (:func:`concentration`).

    With per-neuron selection every row gets about the same number of entries, so the per-layer counts only
    restate the budget; which inputs those entries use is what the task's data decided.
    """
    layers = []
    for name, shape in mask.shapes.items():  # model order
        if name not in mask.indices or len(shape) < 2:
            continue
        idx = mask.indices[name]
        layers.append({"name": name, "selected": int(np.asarray(idx).size), **concentration(column_counts(idx, shape))})
    summary = {
        "layers": len(layers),
        "top_fraction": TOP_COLUMNS,
        "distinct_pct_mean": sum(r["distinct_pct"] for r in layers) / len(layers) if layers else 0.0,
        "top_share_mean": sum(r["top_share"] for r in layers) / len(layers) if layers else 0.0,
    }
    return {"summary": summary, "layers": layers}


def column_comparison(a: Mask | MaskArrays, b: Mask | MaskArrays, top: int = 3) -> dict[str, Any]:
    """Where two masks differ in which input columns they use, per layer either selects in.

    Per layer: the columns each uses (``columns_a``, ``columns_b``), those both use, their Jaccard, and the ``top``
    columns whose selected-entry counts differ most, as ``[column, entries in a, entries in b]``.
    """
    layers = {}
    for name, shape in a.shapes.items():  # model order
        if (name not in a.indices and name not in b.indices) or len(shape) < 2:
            continue
        empty = np.zeros(0, dtype=np.int64)
        ca = column_counts(a.indices.get(name, empty), shape)
        cb = column_counts(b.indices.get(name, empty), shape)
        used_a, used_b = ca > 0, cb > 0
        both, either = int((used_a & used_b).sum()), int((used_a | used_b).sum())
        gap = np.abs(ca - cb)
        order = np.argsort(-gap, kind="stable")[:top]
        layers[name] = {
            "columns_a": int(used_a.sum()),
            "columns_b": int(used_b.sum()),
            "columns_both": both,
            "columns_jaccard": both / either if either else 1.0,
            "most_different": [[int(c), int(ca[c]), int(cb[c])] for c in order if gap[c] > 0],
        }
    jaccards = [r["columns_jaccard"] for r in layers.values()]
    return {"columns_jaccard_mean": sum(jaccards) / len(jaccards) if jaccards else 1.0, "layers": layers}


def _as_torch(mask: Mask | MaskArrays) -> Mask:
    from .formats import Mask

    if isinstance(mask, Mask):
        return mask
    import torch

    indices = {n: torch.from_numpy(i) for n, i in mask.indices.items()}
    return Mask(indices, list(mask.fully_trainable), dict(mask.shapes), dict(mask.provenance))


def export_dense(
    mask: Mask | MaskArrays, path: str | os.PathLike, *, tx: Transaction | None = None, overwrite: bool = False
) -> None:
    """Write ``mask`` as dense boolean tensors, one per parameter, True where trainable (atomically; ``tx``: as
    part of a group commit; an existing file only with ``overwrite=True``)."""
    from .formats import write_atomic

    metadata = {"format": "pt", "fps.dense_mask": "1"}
    write_atomic(path, _as_torch(mask).dense(), metadata, tx=tx, overwrite=overwrite)


def compare_report(a: Mask | MaskArrays, b: Mask | MaskArrays) -> dict[str, Any]:
    """Per-layer and total overlap and Jaccard of two masks (:func:`.compare.compare_masks`), and where the input
    columns they use differ (:func:`column_comparison`)."""
    from .compare import compare_masks

    return {**compare_masks(_as_torch(a), _as_torch(b)).to_dict(), "columns": column_comparison(a, b)}


# ---------------------------------------------------------------------------------------------- scores


def distribution(values: Tensor) -> dict[str, Any]:
    """count, mean, min, max and the :data:`QUANTILES` of ``values`` (linear interpolation, any size)."""
    v = values.detach().reshape(-1).double()
    n = int(v.numel())
    if n == 0:
        return {"count": 0}
    ordered = v.sort().values
    out: dict[str, Any] = {"count": n, "mean": float(v.mean()), "min": float(ordered[0]), "max": float(ordered[-1])}
    for q in QUANTILES:
        pos = q * (n - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out[f"q{round(q * 100):02d}"] = float(ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo))
    return out


def scores_report(path: str | os.PathLike, norm: str = "l1") -> dict[str, Any]:
    """The distribution of each layer's statistic: ``a`` (``l1``: mean ``|x|``; ``l2``: root mean square) for an
    input score file, ``|summed gradient|`` for a gradient one."""
    from .formats import read_gradient_scores, read_scores, score_statistic

    statistic = score_statistic(path)
    layers = []
    if statistic == "gradient":
        gradients, prov = read_gradient_scores(path)
        for name, g in gradients.items():
            layers.append({"name": name, "shape": list(g.shape), **distribution(g.abs())})
        shown = "|grad|"
    else:
        stats, prov = read_scores(path)
        for name, s in stats.items():
            a = s.abs_sum / max(s.count, 1) if norm == "l1" else (s.sq_sum / max(s.count, 1)).sqrt()
            layers.append({"name": name, "shape": list(a.shape), "samples": s.count, **distribution(a)})
        shown = "a (mean |x|)" if norm == "l1" else "a (rms x)"
    layers.sort(key=lambda r: natural_key(r["name"]))  # the file's order is alphabetical; blocks.10 after blocks.9
    return {
        "kind": "scores",
        "file": str(path),
        "statistic": prov.get("statistic"),
        "shown": shown,
        "norm": norm if statistic != "gradient" else None,
        "provenance": prov,
        "totals": {"layers": len(layers), "values": sum(r["count"] for r in layers)},
        "layers": layers,
    }


# ----------------------------------------------------------------------------------------------- deltas


def delta_report(delta: Delta, path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Training configuration, final metrics and, per trained parameter, the size of its change.

    A partially trained parameter reports its change (the delta values: L2 norm, max and mean ``|change|``);
    a fully trained one reports its new value's L2 norm (the base is not loaded to subtract it).
    """
    prov = dict(delta.provenance)
    layers = []
    for name, shape in delta.shapes.items():
        if name in delta.indices:
            v = delta.values[name].double()
            layers.append(
                {
                    "name": name,
                    "shape": list(shape),
                    "kind": "partial",
                    "entries": int(v.numel()),
                    "change_l2": float(v.norm()),
                    "change_max_abs": float(v.abs().max()) if v.numel() else 0.0,
                    "change_mean_abs": float(v.abs().mean()) if v.numel() else 0.0,
                }
            )
        elif name in delta.full:
            v = delta.full[name].double()
            layers.append(
                {
                    "name": name,
                    "shape": list(shape),
                    "kind": "full",
                    "entries": int(v.numel()),
                    "value_l2": float(v.norm()),
                }
            )
    partial = sum(r["entries"] for r in layers if r["kind"] == "partial")
    full = sum(r["entries"] for r in layers if r["kind"] == "full")
    return {
        "kind": "delta",
        "file": str(path) if path is not None else None,
        "provenance": {k: v for k, v in prov.items() if k not in ("train_config", "metrics")},
        "train_config": prov.get("train_config"),
        "metrics": prov.get("metrics"),
        "totals": {
            "trained": partial + full,
            "partial_entries": partial,
            "full_entries": full,
            "partial_tensors": len(delta.indices),
            "full_tensors": len(delta.full),
            "total_params": sum(_numel(s) for s in delta.shapes.values()),
            "change_l2": math.sqrt(sum(r["change_l2"] ** 2 for r in layers if r["kind"] == "partial")),
        },
        "layers": layers,
    }


# ------------------------------------------------------------------------------------------------- files


def inspect_files(
    paths: list[str | os.PathLike], *, norm: str = "l1"
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, MaskArrays]]:
    """Reports for every file, and the comparison when exactly two masks are given.

    Returns:
        (one report per file, in order; the comparison of two masks or None; the masks read, by path).

    Raises:
        FileFormatError: a file is missing, truncated, foreign, of a newer version, or two masks are of
            different models.
    """
    reports, masks = [], {}
    for path in paths:
        kind = file_kind(path)
        if kind == "mask":
            mask = read_mask_arrays(path)
            masks[str(path)] = mask
            reports.append(mask_report(mask, path))
        elif kind == "scores":
            reports.append(scores_report(path, norm))
        else:
            from .formats import read_delta

            reports.append(delta_report(read_delta(path), path))
    comparison = None
    if len(paths) == 2 and len(masks) == 2:
        a, b = masks.values()
        comparison = compare_report(a, b)
    return reports, comparison, masks
