"""compare_masks on hand-made masks: per-layer and total overlap and Jaccard."""

from __future__ import annotations

import pytest
import torch

from fps_cli.compare import compare_masks
from fps_cli.errors import FileFormatError
from fps_cli.formats import Mask

SHAPES = {"a.weight": (4, 5), "a.bias": (4,), "b.weight": (3, 3), "c.weight": (2, 2), "head.weight": (2, 3)}


def mask(indices: dict[str, list[int]], fully=("a.bias", "head.weight"), shapes=SHAPES) -> Mask:
    return Mask({k: torch.tensor(v, dtype=torch.long) for k, v in indices.items()}, list(fully), dict(shapes))


def test_overlap_and_jaccard_by_hand():
    a = mask({"a.weight": [0, 1, 2, 3], "b.weight": [0, 8]})
    b = mask({"a.weight": [2, 3, 4, 5], "b.weight": [1, 2, 3], "c.weight": [0]})
    result = compare_masks(a, b)

    layer = result.layers["a.weight"]  # A={0,1,2,3}, B={2,3,4,5}: 2 shared of 6
    assert (layer.selected_a, layer.selected_b, layer.intersection, layer.union) == (4, 4, 2, 6)
    assert layer.jaccard == pytest.approx(2 / 6) and layer.overlap == pytest.approx(2 / 4)
    assert result.layers["b.weight"].jaccard == 0.0 and result.layers["b.weight"].overlap == 0.0
    assert result.layers["c.weight"].jaccard == 0.0  # only b selects here
    assert list(result.layers) == ["a.weight", "b.weight", "c.weight"]

    # Totals pool the entries: |A|=6, |B|=8, shared 2, union 12.
    assert (result.total.selected_a, result.total.selected_b, result.total.intersection) == (6, 8, 2)
    assert result.jaccard == pytest.approx(2 / 12)
    assert result.overlap == pytest.approx(2 / 6)
    assert result.same_fully_trainable


def test_identical_and_empty_masks():
    a = mask({"a.weight": [1, 7], "c.weight": [3]})
    same = compare_masks(a, a)
    assert same.jaccard == 1.0 and same.overlap == 1.0
    assert all(layer.jaccard == 1.0 for layer in same.layers.values())
    nothing = compare_masks(mask({}), mask({}))
    assert nothing.layers == {} and nothing.jaccard == 1.0 and nothing.overlap == 1.0
    one_empty = compare_masks(a, mask({}))
    assert one_empty.jaccard == 0.0 and one_empty.overlap == 0.0


def test_symmetric_and_json_ready():
    a = mask({"a.weight": [0, 1, 2], "b.weight": [4]})
    b = mask({"a.weight": [1, 2, 9], "b.weight": [4, 5]}, fully=("a.bias",))
    ab, ba = compare_masks(a, b), compare_masks(b, a)
    assert ab.jaccard == ba.jaccard and ab.overlap == ba.overlap
    assert not ab.same_fully_trainable
    summary = ab.to_dict()
    assert summary["intersection"] == 3 and summary["union"] == 6
    assert summary["layers"]["b.weight"] == {
        "selected_a": 1,
        "selected_b": 2,
        "intersection": 1,
        "union": 2,
        "jaccard": 0.5,
        "overlap": 1.0,
    }


def test_masks_of_different_models_are_refused_with_every_problem():
    other = {**SHAPES, "a.weight": (5, 4), "d.weight": (2, 2)}
    a = mask({"a.weight": [0]})
    b = mask({"a.weight": [0], "d.weight": [1]}, shapes=other)
    with pytest.raises(FileFormatError) as info:
        compare_masks(a, b)
    message = str(info.value)
    assert "a.weight: [4, 5] in a vs [5, 4] in b" in message
    assert "d.weight is selected in b but not a parameter of a's model" in message
