"""How much two masks agree: per-layer and total overlap and Jaccard index of their selected entries.

Only the partially selected entries (:attr:`Mask.indices`) are compared: the fully trainable parameters (head,
biases) follow from the model and ``train_bias``, not from the scores, and are reported separately. For two sets
``A`` and ``B`` of selected entries:

- ``jaccard = |A & B| / |A | B|``;
- ``overlap = |A & B| / min(|A|, |B|)`` (the overlap coefficient: at equal budget, the fraction of one mask's
  selection the other shares).

Both are 1.0 when neither mask selects anything in a layer, and 0.0 when exactly one does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import FileFormatError
from .formats import Mask


@dataclass(frozen=True)
class LayerComparison:
    """Agreement of two masks on one parameter.

    Attributes:
        selected_a: entries mask ``a`` selects.
        selected_b: entries mask ``b`` selects.
        intersection: entries both select.
    """

    selected_a: int
    selected_b: int
    intersection: int

    @property
    def union(self) -> int:
        return self.selected_a + self.selected_b - self.intersection

    @property
    def jaccard(self) -> float:
        return self.intersection / self.union if self.union else 1.0

    @property
    def overlap(self) -> float:
        smaller = min(self.selected_a, self.selected_b)
        if smaller:
            return self.intersection / smaller
        return 1.0 if self.union == 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "selected_a": self.selected_a,
            "selected_b": self.selected_b,
            "intersection": self.intersection,
            "union": self.union,
            "jaccard": self.jaccard,
            "overlap": self.overlap,
        }


@dataclass(frozen=True)
class MaskComparison:
    """Agreement of two masks, per parameter (model order) and in total.

    Attributes:
        layers: parameter name -> its comparison, for every parameter either mask selects entries of.
        total: the comparison of all selected entries pooled.
        same_fully_trainable: both masks train the same parameters in full.
    """

    layers: dict[str, LayerComparison]
    total: LayerComparison
    same_fully_trainable: bool

    @property
    def jaccard(self) -> float:
        return self.total.jaccard

    @property
    def overlap(self) -> float:
        return self.total.overlap

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary."""
        return {
            **self.total.to_dict(),
            "same_fully_trainable": self.same_fully_trainable,
            "layers": {name: layer.to_dict() for name, layer in self.layers.items()},
        }


def compare_masks(a: Mask, b: Mask) -> MaskComparison:
    """Compare the selections of two masks of the same model.

    Raises:
        FileFormatError: the masks are of different models, listing every parameter whose shape differs and
            every selected parameter the other model lacks.
    """
    problems = [
        f"{name}: {list(a.shapes[name])} in a vs {list(b.shapes[name])} in b"
        for name in a.shapes
        if name in b.shapes and tuple(a.shapes[name]) != tuple(b.shapes[name])
    ]
    problems += [
        f"{name} is selected in a but not a parameter of b's model" for name in a.indices if name not in b.shapes
    ]
    problems += [
        f"{name} is selected in b but not a parameter of a's model" for name in b.indices if name not in a.shapes
    ]
    if problems:
        raise FileFormatError("the masks are of different models:\n  " + "\n  ".join(problems))

    order = list(a.shapes) + [name for name in b.shapes if name not in a.shapes]
    empty = torch.zeros(0, dtype=torch.long)
    layers = {}
    for name in order:
        if name not in a.indices and name not in b.indices:
            continue
        ia, ib = a.indices.get(name, empty), b.indices.get(name, empty)
        common = int(torch.isin(ia, ib).sum()) if ia.numel() and ib.numel() else 0
        layers[name] = LayerComparison(int(ia.numel()), int(ib.numel()), common)
    total = LayerComparison(
        sum(c.selected_a for c in layers.values()),
        sum(c.selected_b for c in layers.values()),
        sum(c.intersection for c in layers.values()),
    )
    return MaskComparison(layers, total, set(a.fully_trainable) == set(b.fully_trainable))
