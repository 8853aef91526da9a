"""Where the top-k per neuron is taken: scores -> selected entries, as pure tensor functions.

Every function takes a mapping ``name -> scores [rows, cols]`` in model order (a plain dict, or a lazy mapping
that computes a layer's scores on access) and returns ``name -> sorted flat indices`` (int64) of the selected
entries; layers with nothing selected are left out. Ties always break towards the lower index (within a row,
then rows in model order, then layers in model order), so the result is deterministic and identical on CPU and
CUDA. No function ever holds more than one layer's scores at a time, except ``global``'s per-layer top values.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .constants import GRANULARITIES


def _check_finite(name: str, scores: Tensor) -> Tensor:
    if not torch.isfinite(scores).all():
        raise ValueError(f"scores of {name!r} contain NaN or infinity")
    return scores


def rowwise_top(scores: Tensor, k: Tensor) -> Tensor:
    """Boolean mask of the top ``k[r]`` entries of each row ``r``; ties go to the lower column.

    Args:
        scores: ``[rows, cols]``.
        k: ``[rows]`` integer counts, ``0 <= k[r] <= cols``.
    """
    rows = scores.shape[0]
    k = k.to(device=scores.device, dtype=torch.long)
    kmax = int(k.max()) if rows else 0
    if kmax == 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    top = scores.topk(kmax, dim=1).values  # [rows, kmax], descending
    threshold = top.gather(1, (k - 1).clamp(min=0).unsqueeze(1))  # [rows, 1]: the k-th best score
    above = scores > threshold
    tied = scores == threshold
    room = k.unsqueeze(1) - above.sum(1, keepdim=True)  # how many tied entries each row still takes
    take_tied = tied & (tied.cumsum(1) <= room)
    return (above | take_tied) & (k.unsqueeze(1) > 0)


def top_n(values: Tensor, n: int) -> Tensor:
    """Boolean mask of the ``n`` largest entries of a 1-D tensor; ties go to the lower index."""
    if n <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    return rowwise_top(values.unsqueeze(0), torch.tensor([n])).squeeze(0)


def _flat_indices(mask: Tensor) -> Tensor:
    return mask.reshape(-1).nonzero().squeeze(1).cpu()


def _collect(scores: Mapping[str, Tensor], counts: Mapping[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for name, k in counts.items():
        if int(k.sum()) == 0:
            continue
        s = _check_finite(name, scores[name])
        out[name] = _flat_indices(rowwise_top(s, k))
    return out


def select_topk_per_neuron(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Exactly ``k`` entries in every row (all of a row that has fewer than ``k``): GPS's setting."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    counts = {}
    for name in scores:
        rows, cols = scores[name].shape
        counts[name] = torch.full((rows,), min(k, cols), dtype=torch.long)
    return _collect(scores, counts)


def _base_k(shapes: list[tuple[int, int]], n: int) -> int:
    """The largest K with sum over rows of min(K, cols) <= n."""
    lo, hi = 0, max((c for _, c in shapes), default=0)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(r * min(mid, c) for r, c in shapes) <= n:
            lo = mid
        else:
            hi = mid - 1
    return lo


def select_neuron(scores: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """Neuron-level selection of exactly ``n`` entries.

    With ``R`` candidate rows every row gets its top ``K = n // R`` entries; the remaining ``n - K*R`` go, one
    each, to the rows whose ``(K+1)``-th best score is highest. A row shorter than ``K`` is taken whole and ``K``
    is raised until the count is met, so the total is exact whatever the layer widths.
    """
    shapes = {name: tuple(scores[name].shape) for name in scores}
    capacity = sum(r * c for r, c in shapes.values())
    if not 0 <= n <= capacity:
        raise ValueError(f"cannot select {n} of {capacity} candidate entries")
    k = _base_k(list(shapes.values()), n)
    remainder = n - sum(r * min(k, c) for r, c in shapes.values())

    # The (K+1)-th best score of every row that has one, rows of all layers in model order.
    next_best = []
    for name, (rows, cols) in shapes.items():
        if remainder and cols > k:
            s = _check_finite(name, scores[name])
            next_best.append(s.topk(k + 1, dim=1).values[:, k].float().cpu())
        else:
            next_best.append(torch.full((rows,), float("-inf")))
    extra = top_n(torch.cat(next_best), remainder) if next_best else torch.zeros(0, dtype=torch.bool)

    counts, start = {}, 0
    for name, (rows, cols) in shapes.items():
        counts[name] = min(k, cols) + extra[start : start + rows].long()
        start += rows
    return _collect(scores, counts)


def _largest_remainder(sizes: list[int], n: int) -> list[int]:
    """Split ``n`` in proportion to ``sizes`` into integers that sum to ``n`` exactly (ties: earlier first)."""
    total = sum(sizes)
    shares = [n * s // total for s in sizes]
    left = n - sum(shares)
    order = sorted(range(len(sizes)), key=lambda i: (-((n * sizes[i]) % total), i))
    for i in order[:left]:
        shares[i] += 1
    return shares


def select_layer(scores: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """Every layer gets its share of ``n`` in proportion to its size, filled with its top scores."""
    names = list(scores)
    sizes = [scores[name].numel() for name in names]
    if not 0 <= n <= sum(sizes):
        raise ValueError(f"cannot select {n} of {sum(sizes)} candidate entries")
    out = {}
    for name, share in zip(names, _largest_remainder(sizes, n), strict=True):
        if share:
            s = _check_finite(name, scores[name])
            out[name] = _flat_indices(top_n(s.reshape(-1), share))
    return out


def select_global(scores: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """The top ``n`` scores over all candidates pooled; ties go to the earlier layer, then lower index."""
    names = list(scores)
    capacity = sum(scores[name].numel() for name in names)
    if not 0 <= n <= capacity:
        raise ValueError(f"cannot select {n} of {capacity} candidate entries")
    if n == 0:
        return {}
    # The n-th best score overall is among the per-layer top n values.
    tops = [
        _check_finite(name, scores[name]).reshape(-1).topk(min(n, scores[name].numel())).values.float().cpu()
        for name in names
    ]
    threshold = torch.cat(tops).topk(n).values[-1]
    above = [int((t > threshold).sum()) for t in tops]
    room = n - sum(above)  # tied entries still to take, earliest first
    out = {}
    for name, n_above in zip(names, above, strict=True):
        s = scores[name].reshape(-1).float()
        n_tied = int((s == threshold.to(s.device)).sum())
        take = n_above + min(room, n_tied)
        room -= min(room, n_tied)
        if take:
            out[name] = _flat_indices(top_n(s, take))
    return out


def select(scores: Mapping[str, Tensor], n: int, granularity: str = "neuron") -> dict[str, Tensor]:
    """Select exactly ``n`` entries at the given granularity (``neuron``, ``layer`` or ``global``)."""
    if granularity == "neuron":
        return select_neuron(scores, n)
    if granularity == "layer":
        return select_layer(scores, n)
    if granularity == "global":
        return select_global(scores, n)
    raise ValueError(f"unknown granularity {granularity!r}; expected one of {GRANULARITIES}")
