"""Hugging Face transformers models (``--model hf:ID_OR_PATH``): select, train, eval, save_pretrained round trip."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_hf_vit
from typer.testing import CliRunner

pytest.importorskip("transformers")

from fps_cli.cli import app
from fps_cli.errors import FpsError, ModelError, OutputExistsError
from fps_cli.models import ModelSpec, create_model, output_logits, save_hf_pretrained

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]


def fps(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def hf_vit(tmp_path: Path) -> Path:
    """A tiny random ViT (hidden 32, 2 layers, 2 heads, 32x32 images, 8x8 patches, 3 labels) and its processor."""
    folder = tmp_path / "tiny-vit"
    tiny_hf_vit(folder)
    return folder


def test_select_train_eval_then_save_pretrained_gives_the_same_logits(hf_vit, image_folder, tmp_path, monkeypatch):
    from transformers import AutoModelForImageClassification

    from fps_cli.finetune import attach_delta, spec_from_provenance
    from fps_cli.formats import read_delta, read_mask
    from fps_cli.sparse import apply_delta

    data = image_folder(classes=3, per_class=4, val_per_class=2)
    monkeypatch.chdir(tmp_path)
    selected = fps("select", "--model", f"hf:{hf_vit}", "--data", data, "--budget", "0.2", *FAST, "--json", "-q")
    assert selected.exit_code == 0, selected.output
    assert json.loads(selected.stdout)["model"] == f"hf:{hf_vit.resolve()}"
    mask = read_mask(tmp_path / "mask.safetensors")
    own = {n: tuple(p.shape) for n, p in create_model(ModelSpec(f"hf:{hf_vit}")).named_parameters()}
    assert mask.shapes == own  # the model's own names, no wrapper prefix
    assert "vit.layers.0.attention.q_proj.weight" in mask.indices

    trained = fps("train", "--epochs", "1", "--lr", "1e-2", *FAST, "--json", "-q")
    assert trained.exit_code == 0, trained.output
    metrics = json.loads(trained.stdout)["metrics"]
    evaluated = fps("eval", "--num-workers", "0", "--json", "-q")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["top1"] == metrics["val_top1"]

    # What `fps merge` does for an hf: model: base weights + delta, written as a save_pretrained folder.
    delta = read_delta(tmp_path / "delta.safetensors")
    spec = spec_from_provenance(delta.provenance)
    base = create_model(spec)
    merged = apply_delta(base.state_dict(), delta.indices, delta.values, delta.full)
    out = save_hf_pretrained(base, tmp_path / "merged", state_dict=merged, labels=delta.provenance["classes"])
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in out.iterdir()}

    reloaded = AutoModelForImageClassification.from_pretrained(out).eval()
    assert reloaded.config.num_labels == 3
    assert reloaded.config.id2label == {0: "class_0", 1: "class_1", 2: "class_2"}
    fine_tuned = create_model(spec)
    attach_delta(fine_tuned, delta)
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        expected = output_logits(fine_tuned(images))
        assert not torch.allclose(expected, output_logits(base(images)))  # training changed something
        torch.testing.assert_close(reloaded(images).logits, expected, rtol=0, atol=1e-6)

    with pytest.raises(OutputExistsError, match="--force"):
        save_hf_pretrained(base, out, state_dict=merged)

    # The same through the commands: fps merge -o DIR/ writes a save_pretrained folder; fps inspect reads the files.
    merged_cli = fps("merge", "-o", "merged_cli/", "--json", "-q")
    assert merged_cli.exit_code == 0, merged_cli.output
    assert json.loads(merged_cli.stdout)["directory"] is True
    from_cli = AutoModelForImageClassification.from_pretrained(tmp_path / "merged_cli").eval()
    with torch.no_grad():
        torch.testing.assert_close(from_cli(images).logits, expected, rtol=0, atol=1e-6)
    single = fps("merge", "-o", "merged.safetensors", "-q")
    assert single.exit_code == 0, single.output
    from safetensors.torch import load_file

    plain = create_model(spec)
    plain.load_state_dict(load_file(tmp_path / "merged.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(output_logits(plain.eval()(images)), expected, rtol=0, atol=1e-6)
    for path in ("mask.safetensors", "scores.safetensors", "delta.safetensors"):
        report = fps("inspect", path, "--json")
        assert report.exit_code == 0, report.output
        assert json.loads(report.stdout)


def test_fps_scores_equal_the_definition(hf_vit, image_folder):
    """score = |W| * mean |input| over every token (q_proj) or every unfolded patch (the patch-embedding conv)."""
    from fps_cli.candidates import parameter_roles
    from fps_cli.data import discover, eval_transform
    from fps_cli.scoring import make_scores
    from fps_cli.selector import SelectOptions, run_select

    data = image_folder(classes=3, per_class=3)
    spec = ModelSpec(f"hf:{hf_vit}", num_classes=3)
    result = run_select(spec, data, SelectOptions(budget=0.2), batch_size=4, num_workers=0)
    model = create_model(spec)
    scores = make_scores("fps", parameter_roles(model).candidates, stats=result.stats)

    transform = eval_transform(model)
    from PIL import Image

    images = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in discover(data).train.samples])
    query = model.vit.layers[0].attention.q_proj
    patch = model.vit.embeddings.patch_embeddings.projection
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module, args, output) -> None:
            seen[key] = args[0]

        return hook

    hooks = [query.register_forward_hook(keep("q")), patch.register_forward_hook(keep("patch"))]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()

    a_query = seen["q"].abs().reshape(-1, seen["q"].shape[-1]).double().mean(0)  # [in]
    expected = query.weight.detach().abs().double() * a_query
    torch.testing.assert_close(scores["vit.layers.0.attention.q_proj.weight"].double(), expected, rtol=1e-5, atol=0)

    unfolded = F.unfold(seen["patch"], kernel_size=8, stride=8)  # [batch, 3*8*8, patches]
    a_patch = unfolded.abs().double().mean(dim=(0, 2))  # [3*8*8]
    expected = patch.weight.detach().abs().double().reshape(32, -1) * a_patch
    name = "vit.embeddings.patch_embeddings.projection.weight"
    torch.testing.assert_close(scores[name].double().reshape(32, -1), expected, rtol=1e-5, atol=0)


def test_candidates_by_module_type(hf_vit):
    from fps_cli.candidates import find_head, parameter_roles

    model = create_model(ModelSpec(f"hf:{hf_vit}", num_classes=5))
    assert find_head(model) == [model.classifier]
    assert model.classifier.out_features == 5
    roles = parameter_roles(model)
    assert {"classifier.weight", "classifier.bias"} <= set(roles.fully_trainable)
    assert "vit.layers.0.attention.q_proj.bias" in roles.fully_trainable
    for frozen in (
        "vit.embeddings.cls_token",
        "vit.embeddings.position_embeddings",
        "vit.layers.0.layernorm_before.weight",
        "vit.layernorm.bias",
    ):
        assert frozen in roles.frozen
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "classifier"}
    assert set(roles.candidates) == {f"{n}.weight" for n in linear} | {
        "vit.embeddings.patch_embeddings.projection.weight"
    }
    no_bias = parameter_roles(model, train_bias=False)
    assert set(no_bias.fully_trainable) == {"classifier.weight", "classifier.bias"}


def test_processor_becomes_the_timm_transform(hf_vit):
    """The timm eval transform built from the processor gives the processor's own pixel values."""
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from fps_cli.data import eval_transform, transform_config

    model = create_model(ModelSpec(f"hf:{hf_vit}"))
    config = transform_config(model)
    assert config["input_size"] == (3, 32, 32) and config["mean"] == (0.5, 0.5, 0.5)
    assert (config["crop_pct"], config["crop_mode"], config["interpolation"]) == (1.0, "squash", "bilinear")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8))
    ours = eval_transform(model)(image)
    theirs = AutoImageProcessor.from_pretrained(hf_vit)(image, return_tensors="pt").pixel_values[0]
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_data_config_of_other_processors():
    from transformers import CLIPImageProcessor, ConvNextImageProcessor

    from fps_cli.hf import data_config

    class Config:
        image_size = 224

    convnext = data_config(ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875), Config())
    assert convnext["input_size"] == (3, 224, 224)
    assert (convnext["crop_pct"], convnext["crop_mode"], convnext["interpolation"]) == (0.875, "center", "bicubic")
    clip = data_config(CLIPImageProcessor(), Config())
    assert (clip["input_size"], clip["crop_pct"], clip["crop_mode"]) == ((3, 224, 224), 1.0, "center")
    assert data_config(None, Config()) == {"input_size": (3, 224, 224)}  # timm fills in its defaults


def test_unreachable_hub_fails_at_once_with_one_message(image_folder, tmp_path):
    data = image_folder(classes=2, per_class=2)
    start = time.perf_counter()
    with pytest.raises(ModelError, match=r"cannot download the model config for hf:some-org/some-model: .*unreachable"):
        create_model(ModelSpec("hf:some-org/some-model"))
    assert time.perf_counter() - start < 5

    out = ["-o", tmp_path / "m.safetensors", "--no-scores"]
    result = fps("select", "--model", "hf:some-org/some-model", "--data", data, *out, "-q")
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and "unreachable" in result.stderr and "hf:PATH" in result.stderr
    offline = fps("select", "--model", "hf:some-org/some-model", "--data", data, *out, "--offline", "-q")
    assert offline.exit_code == 1
    assert offline.stderr.count("\n") == 1 and "offline mode" in offline.stderr


def test_bad_names_and_remote_code(tmp_path):
    with pytest.raises(ModelError, match=r"there is no folder \./missing"):
        create_model(ModelSpec("hf:./missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"has no config\.json"):
        create_model(ModelSpec(f"hf:{tmp_path / 'empty'}"))
    custom = tmp_path / "custom"
    custom.mkdir()
    auto_map = {"AutoConfig": "conf.FancyConfig", "AutoModelForImageClassification": "model.Fancy"}
    (custom / "config.json").write_text(json.dumps({"model_type": "fancy", "auto_map": auto_map}))
    with pytest.raises(ModelError, match="pass --trust-remote-code"):
        create_model(ModelSpec(f"hf:{custom}"))


def test_without_transformers_the_message_says_how_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    hidden = lambda name, *args: None if name == "transformers" else find_spec(name, *args)  # noqa: E731
    monkeypatch.setattr(importlib.util, "find_spec", hidden)
    with pytest.raises(FpsError, match=r'pip install "fps-cli\[hf\]"'):
        create_model(ModelSpec("hf:google/vit-base-patch16-224"))


def test_no_pretrained_is_seeded_and_gps_sees_the_cls_token(hf_vit):
    from fps_cli.gradients import pre_logits
    from fps_cli.selector import base_digest, seed_everything

    seed_everything(3)
    first = create_model(ModelSpec(f"hf:{hf_vit}", pretrained=False))
    seed_everything(3)
    second = create_model(ModelSpec(f"hf:{hf_vit}", pretrained=False))
    assert base_digest(first) == base_digest(second)
    assert base_digest(first) != base_digest(create_model(ModelSpec(f"hf:{hf_vit}")))

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        cls_token = first.vit(images).last_hidden_state[:, 0]  # the feature ViTForImageClassification classifies
        torch.testing.assert_close(pre_logits(first, images), cls_token)


def test_cached_hub_model_loads_without_network(hf_vit, tmp_path, monkeypatch):
    """A hub id whose files are in the HF cache loads with the endpoint refusing connections (no retry loop)."""
    import shutil

    from huggingface_hub import constants

    repo = tmp_path / "hub" / "models--some-org--tiny-vit"
    snapshot = repo / "snapshots" / ("0" * 40)
    shutil.copytree(hf_vit, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    model = create_model(ModelSpec("hf:some-org/tiny-vit", num_classes=4))
    assert time.perf_counter() - start < 10
    reference = create_model(ModelSpec(f"hf:{hf_vit}", num_classes=4))
    assert torch.equal(model.vit.layers[1].mlp.fc1.weight, reference.vit.layers[1].mlp.fc1.weight)
    assert model.pretrained_cfg["input_size"] == (3, 32, 32)  # the cached processor was used
    assert constants.HF_HUB_OFFLINE is False  # restored after loading
