"""The ablation methods (weight, activation, random) and --anchor: each score equals its definition, by hand on
the 3-layer MLP; every method selects the same count at the same budget."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VIT, TinyMLP, write_images
from typer.testing import CliRunner

from fps_cli.activations import InputStats, collect_input_stats
from fps_cli.candidates import parameter_roles
from fps_cli.cli import app
from fps_cli.constants import METHODS
from fps_cli.formats import read_mask, read_scores, save_scores
from fps_cli.models import ModelSpec, create_model
from fps_cli.scoring import ANCHOR_EPS, make_scores
from fps_cli.selector import SelectOptions, build_mask, run_select, seed_everything, selection_count

SPEC = ModelSpec("test_vit", pretrained=False, num_classes=2, img_size=32)


@pytest.fixture
def mlp_stats(tiny_mlp: TinyMLP):
    """The MLP, its inputs (in two batches) and the statistics the library gathers over them."""
    x = torch.randn(10, 6)
    roles = parameter_roles(tiny_mlp)
    stats = collect_input_stats(tiny_mlp, roles.candidates, [x[:4], x[4:]])
    return tiny_mlp, x, roles, stats


def layer_inputs(mlp: TinyMLP, x: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"fc1.weight": x, "fc2.weight": torch.relu(mlp.fc1(x)).detach()}


def test_candidates_of_the_mlp(mlp_stats):
    _, _, roles, _ = mlp_stats
    assert list(roles.candidates) == ["fc1.weight", "fc2.weight"]


@pytest.mark.parametrize("norm", ["l1", "l2"])
def test_fps_and_activation_scores_by_hand(mlp_stats, norm):
    mlp, x, roles, stats = mlp_stats
    for name, inputs in layer_inputs(mlp, x).items():
        a = inputs.abs().mean(0) if norm == "l1" else inputs.square().mean(0).sqrt()  # [in]
        w = dict(mlp.named_parameters())[name].detach()
        fps = make_scores("fps", roles.candidates, stats=stats, norm=norm)[name]
        act = make_scores("activation", roles.candidates, stats=stats, norm=norm)[name]
        assert torch.allclose(fps, w.abs() * a, atol=1e-6)
        assert torch.allclose(act, a.expand_as(w), atol=1e-6)


def test_weight_scores_are_magnitudes(mlp_stats):
    mlp, _, roles, _ = mlp_stats
    scores = make_scores("weight", roles.candidates)  # no statistics needed
    assert torch.equal(scores["fc1.weight"], mlp.fc1.weight.detach().abs())
    assert torch.equal(scores["fc2.weight"], mlp.fc2.weight.detach().abs())


def test_random_scores_are_seeded_uniform(mlp_stats):
    _, _, roles, _ = mlp_stats
    scores = make_scores("random", roles.candidates, seed=3)
    for index, (name, shape) in enumerate([("fc1.weight", (5, 6)), ("fc2.weight", (4, 5))]):
        expected = torch.rand(shape, generator=torch.Generator().manual_seed(3 * 1_000_003 + index))
        assert torch.equal(scores[name], expected)
        assert ((scores[name] >= 0) & (scores[name] < 1)).all()
    assert torch.equal(scores["fc1.weight"], make_scores("random", roles.candidates, seed=3)["fc1.weight"])
    assert not torch.equal(scores["fc1.weight"], make_scores("random", roles.candidates, seed=4)["fc1.weight"])


def test_gps_scores_are_gradient_magnitudes(mlp_stats):
    _, _, roles, _ = mlp_stats
    grads = {"fc1.weight": torch.randn(5, 6), "fc2.weight": torch.randn(4, 5)}
    scores = make_scores("gps", roles.candidates, gradients=grads)
    assert all(torch.equal(scores[n], grads[n].abs()) for n in grads)


def test_anchor_scales_the_statistic_by_its_growth(mlp_stats):
    mlp, x, roles, stats = mlp_stats
    x_anchor = torch.randn(7, 6) * 3
    anchor = collect_input_stats(mlp, roles.candidates, [x_anchor])
    task_in, anchor_in = layer_inputs(mlp, x), layer_inputs(mlp, x_anchor)
    for name in roles.candidates:
        growth = task_in[name].abs().mean(0) / (anchor_in[name].abs().mean(0) + ANCHOR_EPS)
        w = dict(mlp.named_parameters())[name].detach()
        got = make_scores("fps", roles.candidates, stats=stats, anchor=anchor)[name]
        assert torch.allclose(got, w.abs() * growth, rtol=1e-5)
    with pytest.raises(ValueError, match="anchor"):
        make_scores("weight", roles.candidates, anchor=anchor)


@pytest.mark.parametrize("granularity", ["neuron", "layer", "global"])
def test_equal_budget_equal_count_on_the_mlp(mlp_stats, granularity):
    _, _, roles, stats = mlp_stats
    grads = {n: torch.randn(roles.shapes[n]) for n in roles.candidates}
    budget = 0.5
    counts = set()
    for method in METHODS:
        scores = make_scores(method, roles.candidates, stats=stats, gradients=grads, seed=1)
        mask = build_mask(roles, scores, SelectOptions(method, budget=budget, granularity=granularity))
        counts.add(mask.selected)
    assert counts == {selection_count(roles, budget)}


def test_equal_budget_equal_count_on_test_vit(image_folder):
    folder = image_folder(classes=2, per_class=3)
    seed_everything(0)
    expected = selection_count(parameter_roles(create_model(SPEC)), 0.05)
    for method in METHODS:
        result = run_select(SPEC, folder, SelectOptions(method, budget=0.05), batch_size=4, num_workers=0)
        assert result.mask.selected == expected, method
        assert result.mask.trainable == round(0.05 * result.mask.total_params), method


def _select(args: list[str]):
    return CliRunner().invoke(app, ["select", *TINY_VIT, "--num-workers", "0", "--budget", "0.05", "-q", *args])


def test_anchor_end_to_end(image_folder, tmp_path):
    task = image_folder(classes=2, per_class=3)
    anchor_dir = tmp_path / "anchor_images"
    write_images(anchor_dir, 4, seed=5)  # unlabeled: a flat folder (one class folder is refused at select)
    anchor, task_scores, mask = tmp_path / "anchor.safetensors", tmp_path / "task.safetensors", tmp_path / "m.st"
    anchor_args = ["--data", str(anchor_dir), "--num-classes", "2", "-o", str(tmp_path / "am.st")]
    result = _select([*anchor_args, "--scores", str(anchor)])
    assert result.exit_code == 0, result.output
    result = _select(["--data", str(task), "--anchor", str(anchor), "-o", str(mask), "--scores", str(task_scores)])
    assert result.exit_code == 0, result.output

    # The same mask, computed by hand from the two score files.
    task_stats, prov = read_scores(task_scores)
    anchor_stats, _ = read_scores(anchor)
    seed_everything(prov["init_seed"])
    model = create_model(ModelSpec("test_vit", pretrained=False, num_classes=2, img_size=32))
    roles = parameter_roles(model)
    by_hand = {}
    for name, module in roles.candidates.items():
        growth = task_stats[name].statistic("l1") / (anchor_stats[name].statistic("l1") + ANCHOR_EPS)
        by_hand[name] = module.weight.detach().reshape(module.weight.shape[0], -1).abs() * growth.reshape(1, -1)
    expected = build_mask(roles, by_hand, SelectOptions(budget=0.05))
    got = read_mask(mask)
    assert got.indices.keys() == expected.indices.keys()
    assert all(torch.equal(got.indices[k], expected.indices[k]) for k in got.indices)
    assert got.provenance["anchor"] == str(anchor.resolve())

    # Re-selecting from the task's score file with the same anchor gives the same mask.
    again = tmp_path / "again.st"
    result = CliRunner().invoke(
        app,
        ["select", "--from-scores", str(task_scores), "--anchor", str(anchor), "--budget", "0.05", "-o", str(again)],
    )
    assert result.exit_code == 0, result.output
    assert all(torch.equal(read_mask(again).indices[k], got.indices[k]) for k in got.indices)


def test_anchor_that_does_not_fit_lists_every_problem(image_folder, tmp_path):
    folder = image_folder(classes=2, per_class=2)
    bad = tmp_path / "bad.safetensors"
    stats = {
        "blocks.0.attn.qkv.weight": InputStats(torch.ones(7), torch.ones(7), 1),  # wrong width
        "not.a.layer.weight": InputStats(torch.ones(3), torch.ones(3), 1),
    }
    save_scores(bad, stats, {"model": "other"})
    result = _select(["--data", str(folder), "--anchor", str(bad), "-o", str(tmp_path / "m.st"), "--no-scores"])
    assert result.exit_code == 1
    assert f"anchor {bad} does not fit test_vit" in result.output
    assert "no statistics for layer patch_embed.proj.weight" in result.output
    assert "not.a.layer.weight, which is not a candidate layer" in result.output
    assert "blocks.0.attn.qkv.weight: statistics [7] do not fit the layer" in result.output


def test_anchor_is_a_usage_error_with_other_methods(image_folder, tmp_path):
    result = _select(["--data", str(image_folder()), "--method", "weight", "--anchor", str(tmp_path / "a.st")])
    assert result.exit_code == 2
    assert "--anchor" in result.output
