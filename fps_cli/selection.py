"""Where the top-k per neuron is taken: scores -> selected entries, as pure tensor functions.

Every function takes a mapping ``name -> scores [rows, cols]`` in model order (a plain dict, or a lazy mapping
that computes a layer's scores on access) and returns ``name -> sorted flat indices`` (int64) of the selected
entries; layers with nothing selected are left out. Ties always break towards the lower index (within a row,
then rows in model order, then layers in model order), so the result is deterministic and identical on CPU and
CUDA.

Cost: each layer's scores are computed once. Per-neuron selection keeps only each row's few best scores between
its two steps and goes back to a layer's full scores only for rows tied at their cut-off; ``layer`` and
``global`` find their cut-off with ``kthvalue`` (linear time) instead of a sort.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .constants import GRANULARITIES


def _check_finite(name: str, largest: Tensor) -> None:
    """Refuse NaN / inf scores, from a tensor that holds the largest ones (``topk`` and ``max`` rank NaN first)."""
    if largest.numel() and not bool(torch.isfinite(largest).all()):
        raise ValueError(f"scores of {name!r} contain NaN or infinity")


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
    """Boolean mask of the ``n`` largest entries of a 1-D tensor; ties go to the lower index. Linear time."""
    size = values.numel()
    if n <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    if n >= size:
        return torch.ones_like(values, dtype=torch.bool)
    threshold = values.kthvalue(size - n + 1).values  # the n-th largest value
    chosen = values > threshold
    room = n - int(chosen.sum())
    if room:
        tied = values == threshold
        chosen |= tied & (tied.cumsum(0) <= room)
    return chosen


def _shapes(scores: Mapping[str, Tensor]) -> dict[str, tuple[int, int]]:
    """Score shapes without computing scores where the mapping can tell them (``ActivationScores.shapes``)."""
    shapes = getattr(scores, "shapes", None)
    return dict(shapes) if shapes is not None else {name: tuple(scores[name].shape) for name in scores}


def _flat_indices(mask: Tensor) -> Tensor:
    return mask.reshape(-1).nonzero().squeeze(1).cpu()


class _RowTops:
    """Each row's best ``width`` scores and their columns, kept between the two steps of per-row selection."""

    def __init__(self, scores: Tensor, width: int) -> None:
        self.cols = scores.shape[1]
        top = scores.topk(min(width, self.cols), dim=1)  # descending; tie order unspecified, resolved below
        self.values, self.indices = top.values, top.indices

    def take(self, name: str, counts: Tensor, scores: Mapping[str, Tensor]) -> Tensor:
        """Flat indices of the top ``counts[r]`` entries of every row.

        A row whose ``counts[r]``-th and next scores differ takes its cached top columns; a row tied at its
        cut-off is redone from the layer's full scores so that the lower columns win.
        """
        counts = counts.to(self.values.device)
        rows, width = self.values.shape
        full_row = counts >= self.cols
        nxt = self.values.gather(1, counts.clamp(max=width - 1).unsqueeze(1)).squeeze(1)
        last = self.values.gather(1, (counts - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        clean = full_row | (counts == 0) | (last > nxt)
        position = torch.arange(width, device=counts.device)
        keep = (position.unsqueeze(0) < counts.unsqueeze(1)) & clean.unsqueeze(1)  # [rows, width]
        row_index = torch.arange(rows, device=counts.device).unsqueeze(1).expand(rows, width)
        flat = (row_index * self.cols + self.indices)[keep]
        if not bool(clean.all()):
            tied_rows = (~clean).nonzero().squeeze(1)
            redo = rowwise_top(scores[name][tied_rows], counts[tied_rows])  # [tied, cols]
            r, c = redo.nonzero(as_tuple=True)
            flat = torch.cat([flat, tied_rows[r] * self.cols + c])
        return flat.sort().values.cpu()


def _row_select(scores: Mapping[str, Tensor], counts_of, width: int) -> dict[str, Tensor]:
    """Shared driver of per-row selection: one scoring pass that keeps each row's top ``width``, then counts."""
    tops = {}
    for name in scores:
        s = scores[name]
        tops[name] = _RowTops(s, width)
        _check_finite(name, tops[name].values[:, :1])
    counts = counts_of(tops)
    return {name: tops[name].take(name, k, scores) for name, k in counts.items() if int(k.sum())}


def select_topk_per_neuron(scores: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
    """Exactly ``k`` entries in every row (all of a row that has fewer than ``k``): GPS's setting."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")

    def counts_of(tops: dict[str, _RowTops]) -> dict[str, Tensor]:
        return {n: torch.full((t.values.shape[0],), min(k, t.cols), dtype=torch.long) for n, t in tops.items()}

    return _row_select(scores, counts_of, k + 1)


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
    shapes = _shapes(scores)
    capacity = sum(r * c for r, c in shapes.values())
    if not 0 <= n <= capacity:
        raise ValueError(f"cannot select {n} of {capacity} candidate entries")
    k = _base_k(list(shapes.values()), n)
    remainder = n - sum(r * min(k, c) for r, c in shapes.values())

    def counts_of(tops: dict[str, _RowTops]) -> dict[str, Tensor]:
        # The (K+1)-th best score of every row that has one, rows of all layers in model order.
        next_best = []
        for name, (rows, cols) in shapes.items():
            if remainder and cols > k:
                next_best.append(tops[name].values[:, k].float().cpu())
            else:
                next_best.append(torch.full((rows,), float("-inf")))
        extra = top_n(torch.cat(next_best), remainder) if next_best else torch.zeros(0, dtype=torch.bool)
        counts, start = {}, 0
        for name, (rows, cols) in shapes.items():
            counts[name] = min(k, cols) + extra[start : start + rows].long()
            start += rows
        return counts

    # Rows hold K or K+1 entries: keeping K+2 scores per row tells whether a row is tied at its cut-off.
    return _row_select(scores, counts_of, k + 2)


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
    sizes = {name: rows * cols for name, (rows, cols) in _shapes(scores).items()}
    if not 0 <= n <= sum(sizes.values()):
        raise ValueError(f"cannot select {n} of {sum(sizes.values())} candidate entries")
    out = {}
    for name, share in zip(sizes, _largest_remainder(list(sizes.values()), n), strict=True):
        if share:
            s = scores[name].reshape(-1)
            _check_finite(name, s.max().unsqueeze(0))
            out[name] = _flat_indices(top_n(s, share))
    return out


def select_global(scores: Mapping[str, Tensor], n: int) -> dict[str, Tensor]:
    """The top ``n`` scores over all candidates pooled; ties go to the earlier layer, then lower index.

    All scores are pooled into one vector (4 bytes per candidate weight) for one linear-time cut-off.
    """
    sizes = {name: rows * cols for name, (rows, cols) in _shapes(scores).items()}
    total = sum(sizes.values())
    if not 0 <= n <= total:
        raise ValueError(f"cannot select {n} of {total} candidate entries")
    pooled, start = None, 0
    for name, size in sizes.items():
        s = scores[name].reshape(-1)
        if pooled is None:
            pooled = torch.empty(total, dtype=s.dtype, device=s.device)
        if size:
            _check_finite(name, s.max().unsqueeze(0))
        pooled[start : start + size] = s
        start += size
    if pooled is None:
        return {}
    chosen = top_n(pooled, n)
    out, start = {}, 0
    for name, size in sizes.items():
        part = chosen[start : start + size]
        start += size
        if bool(part.any()):
            out[name] = _flat_indices(part)
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
