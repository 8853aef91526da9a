"""The fixed-set baselines ``fps select --method full | linear | bias``: the right trainable sets, no data pass, no
budget (said in ``--json`` and in the mask's provenance), and the same ``fps train`` / ``fps eval`` as every mask."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIT
from typer.testing import CliRunner

from fps_cli.candidates import baseline_trainable, find_head
from fps_cli.cli import app
from fps_cli.formats import read_delta, read_mask
from fps_cli.models import ModelSpec, create_model
from fps_cli.selector import seed_everything

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]


def fps(*args):
    return runner.invoke(app, [str(a) for a in args])


def _expected(method: str) -> set[str]:
    model = create_model(ModelSpec("test_vit", pretrained=False, num_classes=3, img_size=32))
    names = [n for n, _ in model.named_parameters()]
    head = {n for n, p in model.named_parameters() if any(p is q for h in find_head(model) for q in h.parameters())}
    if method == "full":
        return set(names)
    if method == "linear":
        return head
    return head | {n for n in names if n.endswith(".bias")}


def test_trainable_sets_by_type_on_test_vit():
    model = create_model(ModelSpec("test_vit", pretrained=False, num_classes=3, img_size=32))
    every = [n for n, _ in model.named_parameters()]
    assert baseline_trainable(model, "full") == every  # norms, pos_embed, cls_token included
    assert baseline_trainable(model, "linear") == ["head.weight", "head.bias"]
    bias = baseline_trainable(model, "bias")
    assert "blocks.0.norm1.bias" in bias and "blocks.0.attn.qkv.bias" in bias  # BitFit: norm biases too
    assert "blocks.0.norm1.weight" not in bias and "pos_embed" not in bias
    assert set(bias) == {"head.weight"} | {n for n in every if n.endswith(".bias")}
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_trainable(model, "fps")


@pytest.mark.parametrize("method", ["full", "linear", "bias"])
def test_baseline_mask_ignores_budget_and_trains_end_to_end(method, image_folder, tmp_path, monkeypatch):
    data = image_folder(classes=3, per_class=4, val_per_class=2)
    monkeypatch.chdir(tmp_path)
    result = fps("select", *TINY_VIT, "--data", data, "--method", method, "--budget", "0.01", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["budget"] is None and summary["budget_ignored"] is True
    assert summary["scores"] is None and summary["selected"] == 0 and summary["num_samples"] == 0
    assert f"--budget is ignored: --method {method} has a fixed trainable set" in result.stderr
    assert not (tmp_path / "scores.safetensors").exists()  # no data pass, nothing to re-select from

    mask = read_mask(tmp_path / "mask.safetensors")
    assert mask.indices == {}  # no partially trainable tensor
    assert set(mask.fully_trainable) == _expected(method)
    assert summary["trainable"] == mask.trainable == sum(torch.Size(mask.shapes[n]).numel() for n in _expected(method))
    prov = mask.provenance
    assert prov["method"] == method and prov["budget"] is None and prov["budget_ignored"] is True
    assert prov["data"] == str(data.resolve()) and prov["classes"] == ["class_0", "class_1", "class_2"]
    assert prov["num_classes"] == 3

    # fps train --mask needs nothing else; every fully trainable tensor is in the delta, nothing else is.
    trained = fps("train", "--epochs", "1", "--lr", "1e-3", *FAST, "--json", "-q")
    assert trained.exit_code == 0, trained.output
    assert json.loads(trained.stdout)["trained"] == mask.trainable
    delta = read_delta(tmp_path / "delta.safetensors")
    assert delta.indices == {} and set(delta.full) == _expected(method)
    seed_everything(0)  # the seed the mask recorded as init_seed
    base = dict(create_model(ModelSpec("test_vit", pretrained=False, num_classes=3, img_size=32)).named_parameters())
    changed = {n for n, v in delta.full.items() if not torch.equal(v, base[n].detach())}
    assert "head.weight" in changed
    if method == "full":
        assert {"pos_embed", "blocks.0.norm1.weight", "blocks.0.attn.qkv.weight"} <= changed

    evaluated = fps("eval", "--num-workers", "0", "--json", "-q")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["samples"] == 6


def test_baseline_usage_errors(image_folder, tmp_path, monkeypatch):
    data = image_folder(classes=2, per_class=2)
    monkeypatch.chdir(tmp_path)
    result = fps("select", "--from-scores", "scores.safetensors", "--method", "linear")
    assert result.exit_code == 2 and "--method linear needs no scores" in result.output
    result = fps("select", *TINY_VIT, "--data", data, "--method", "bias", "--no-train-bias")
    assert result.exit_code == 2 and "--no-train-bias contradicts it" in result.output
    human = fps("select", *TINY_VIT, "--data", data, "--method", "linear", "-q")
    assert human.exit_code == 0, human.output
    assert human.stdout.startswith("--method linear: trainable 130 of ")
