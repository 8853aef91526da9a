"""Selection under a budget: exact counts, K or K+1 per row, deterministic ties (DESIGN.md section 2)."""

from __future__ import annotations

import pytest
import torch

from fps_cli.candidates import parameter_roles
from fps_cli.errors import BudgetError
from fps_cli.selection import rowwise_top, select, select_global, select_layer, select_neuron, select_topk_per_neuron
from fps_cli.selector import SelectOptions, build_mask, selection_count


def random_scores(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}": torch.rand(shape, generator=g) for i, shape in enumerate(shapes)}


def counts_per_row(indices, shape):
    mask = torch.zeros(shape[0] * shape[1], dtype=torch.bool)
    mask[indices] = True
    return mask.reshape(shape).sum(1)


SHAPES = [(7, 5), (3, 11), (10, 4)]


@pytest.mark.parametrize("n", [0, 1, 13, 57, 58, 100, 108])
@pytest.mark.parametrize("granularity", ["neuron", "layer", "global"])
def test_exact_count(granularity, n):
    scores = random_scores(SHAPES)
    picked = select(scores, n, granularity)
    assert sum(int(i.numel()) for i in picked.values()) == n
    for name, idx in picked.items():
        assert idx.dtype == torch.int64
        assert bool((idx[1:] > idx[:-1]).all()), "indices sorted and unique"
        assert int(idx.max()) < scores[name].numel()


@pytest.mark.parametrize("n", [20, 40, 57])
def test_neuron_rows_hold_k_or_k_plus_one(n):
    scores = random_scores(SHAPES)
    rows = sum(s[0] for s in SHAPES)
    k = n // rows
    picked = select_neuron(scores, n)
    for name, shape in zip(scores, SHAPES, strict=True):
        c = counts_per_row(picked.get(name, torch.zeros(0, dtype=torch.long)), shape)
        assert bool(((c == k) | (c == k + 1)).all())


def test_neuron_remainder_goes_to_highest_next_best():
    # Two layers, 2 rows each; n = 5 over 4 rows: K = 1, one extra entry to the row whose 2nd-best is highest.
    scores = {
        "a": torch.tensor([[9.0, 1.0, 0.0], [8.0, 7.0, 0.0]]),
        "b": torch.tensor([[5.0, 6.0, 0.5], [3.0, 2.0, 1.0]]),
    }
    picked = select_neuron(scores, 5)
    assert picked["a"].tolist() == [0, 3, 4]  # row 1 of "a" has the highest 2nd-best score (7)
    assert picked["b"].tolist() == [1, 3]


def test_each_row_takes_its_top_scores():
    scores = random_scores([(6, 9)], seed=3)
    picked = select_neuron(scores, 18)  # K = 3 exactly
    s = scores["layer0"]
    for r in range(6):
        chosen = {int(i) % 9 for i in picked["layer0"] if int(i) // 9 == r}
        assert chosen == set(s[r].topk(3).indices.tolist())


def test_ties_break_towards_lower_index():
    scores = {"a": torch.ones(2, 4), "b": torch.ones(1, 4)}
    # K = 4 // 3 = 1 per row; the one extra entry goes to the earliest row, and within rows to the lowest column.
    assert select_neuron(scores, 4)["a"].tolist() == [0, 1, 4]
    assert select_neuron(scores, 4)["b"].tolist() == [0]
    assert select_global(scores, 5)["a"].tolist() == [0, 1, 2, 3, 4]
    assert "b" not in select_global(scores, 5)
    assert rowwise_top(torch.tensor([[1.0, 2.0, 2.0, 2.0]]), torch.tensor([2])).tolist() == [[False, True, True, False]]


def test_same_mask_whatever_the_order_of_equal_scores_in_memory():
    s = torch.tensor([[0.5, 0.5, 0.5, 0.1, 0.5]])
    picks = [select_neuron({"x": s.clone()}, 2)["x"].tolist() for _ in range(3)]
    assert picks == [[0, 1]] * 3


def test_global_matches_brute_force():
    scores = random_scores(SHAPES, seed=1)
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    order = torch.argsort(flat, descending=True, stable=True)[:50]
    expected = torch.zeros_like(flat, dtype=torch.bool)
    expected[order] = True
    got = torch.zeros_like(flat, dtype=torch.bool)
    start = 0
    for name, s in scores.items():
        if name in (picked := select_global(scores, 50)):
            got[start + picked[name]] = True
        start += s.numel()
    assert torch.equal(got, expected)


def test_layer_shares_are_proportional_and_exact():
    scores = random_scores([(10, 10), (10, 30)])  # sizes 100 and 300
    picked = select_layer(scores, 40)
    assert picked["layer0"].numel() == 10 and picked["layer1"].numel() == 30
    assert set(picked["layer0"].tolist()) == set(scores["layer0"].reshape(-1).topk(10).indices.tolist())


def test_short_rows_are_taken_whole_and_count_stays_exact():
    scores = random_scores([(2, 2), (3, 10)])
    picked = select_neuron(scores, 20)  # K = 5 > 2 columns of layer0: layer0 whole, layer1 gets 16
    assert picked["layer0"].numel() == 4
    assert sum(int(i.numel()) for i in picked.values()) == 20


def test_topk_per_neuron():
    scores = random_scores(SHAPES)
    picked = select_topk_per_neuron(scores, 4)
    for name, shape in zip(scores, SHAPES, strict=True):
        assert bool((counts_per_row(picked[name], shape) == min(4, shape[1])).all())


def test_non_finite_scores_are_refused():
    with pytest.raises(ValueError, match="NaN"):
        select_neuron({"a": torch.tensor([[1.0, float("nan")]])}, 1)


def test_budget_counts_total_trainable(tiny_mlp):
    roles = parameter_roles(tiny_mlp)  # 6*5+5 + 5*4+4 + 4*3+3 = 74 params; fully trainable: 5+4+15 = 24
    assert roles.total_params == 74 and roles.fully_trainable_params == 24
    assert selection_count(roles, 0.5) == 37 - 24
    scores = {n: torch.rand(m.weight.shape) for n, m in roles.candidates.items()}
    mask = build_mask(roles, scores, SelectOptions(budget=0.5))
    assert mask.trainable == round(0.5 * 74)


def test_budget_too_small_names_the_numbers_and_the_way_out(tiny_mlp):
    roles = parameter_roles(tiny_mlp)
    with pytest.raises(BudgetError, match=r"head and biases already take 32\.43% .*--no-train-bias.*0\.3244"):
        selection_count(roles, 0.1)
    with pytest.raises(BudgetError, match="candidate layers hold only 50"):
        selection_count(parameter_roles(tiny_mlp, train_bias=False), 0.99)


@pytest.mark.parametrize("budget", [0.0, 1.0, -0.5, 2.0])
def test_budget_out_of_range(budget):
    with pytest.raises(BudgetError, match="strictly between 0 and 1"):
        SelectOptions(budget=budget)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
@pytest.mark.parametrize("granularity", ["neuron", "layer", "global"])
def test_same_mask_on_cpu_and_cuda(granularity):
    scores = random_scores(SHAPES)
    scores["tied"] = torch.ones(4, 6)
    cpu = select(scores, 60, granularity)
    cuda = select({k: v.cuda() for k, v in scores.items()}, 60, granularity)
    assert cpu.keys() == cuda.keys()
    for k in cpu:
        assert torch.equal(cpu[k], cuda[k])


def reference_neuron(scores: dict[str, torch.Tensor], n: int) -> dict[str, list[int]]:
    """Neuron-level selection by stable sorts, row by row: slow and obviously right."""
    rows = [(name, r) for name, s in scores.items() for r in range(s.shape[0])]
    cols = {name: s.shape[1] for name, s in scores.items()}
    k = 0
    while sum(min(k + 1, cols[name]) for name, _ in rows) <= n:
        k += 1
        if all(k >= c for c in cols.values()):
            break
    counts = {(name, r): min(k, cols[name]) for name, r in rows}
    left = n - sum(counts.values())
    order = {}
    for name, r in rows:
        order[name, r] = torch.sort(scores[name][r], descending=True, stable=True).indices.tolist()
    candidates = [(name, r) for name, r in rows if cols[name] > k]
    next_best = torch.tensor([float(scores[name][r][order[name, r][k]]) for name, r in candidates])
    for i in torch.sort(next_best, descending=True, stable=True).indices[:left].tolist():
        counts[candidates[i]] += 1
    out: dict[str, list[int]] = {}
    for name, r in rows:
        out.setdefault(name, []).extend(r * cols[name] + c for c in order[name, r][: counts[name, r]])
    return {name: sorted(v) for name, v in out.items() if v}


@pytest.mark.parametrize("seed", range(6))
def test_neuron_matches_a_stable_sort_reference_with_many_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = {f"l{i}": torch.randint(0, 4, shape, generator=g).float() for i, shape in enumerate(SHAPES)}
    for n in (5, 30, 58, 77, 107):
        got = {name: idx.tolist() for name, idx in select_neuron(scores, n).items()}
        assert got == reference_neuron(scores, n), n
