"""``fps merge``: base + delta -> weights that load into a fresh timm model and give the trained model's logits."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import CLASS_COLORS, TINY_VIT, write_images
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fps_cli.cli import app

runner = CliRunner()
NUM_CLASSES, IMG = 3, 32


def fps(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A mask from ``fps select`` and a delta from a one-epoch sparse fine-tuning of test_vit, with the model."""
    from fps_cli.finetune import TrainConfig, run_train
    from fps_cli.formats import read_mask, save_delta

    root = tmp_path_factory.mktemp("merge")
    for c in range(NUM_CLASSES):
        write_images(root / "data" / "train" / f"class_{c}", 4, CLASS_COLORS[c], seed=c)
        write_images(root / "data" / "val" / f"class_{c}", 1, CLASS_COLORS[c], seed=100 + c)
    mask = root / "mask.safetensors"
    scores = root / "scores.safetensors"
    result = fps("select", *TINY_VIT, "--data", root / "data", "--budget", "0.05", "-o", mask, "--scores", scores, "-q")
    assert result.exit_code == 0, result.output
    run = run_train(
        read_mask(mask),
        TrainConfig(epochs=1, batch_size=4, lr=1e-2, warmup_epochs=0),
        device="cpu",
        num_workers=0,
        mask_path=mask,
    )
    delta = root / "delta.safetensors"
    save_delta(delta, run.delta)
    return delta, run.model.eval()


@pytest.fixture
def inputs(trained, tmp_path, monkeypatch):
    """The delta copied into a fresh working directory (the cwd); returns (delta, trained model)."""
    delta, model = trained
    local = tmp_path / "delta.safetensors"
    local.write_bytes(delta.read_bytes())
    monkeypatch.chdir(tmp_path)
    return local, model


def images() -> torch.Tensor:
    return torch.randn(4, 3, IMG, IMG, generator=torch.Generator().manual_seed(1))


def fresh(**kwargs) -> torch.nn.Module:
    import timm

    return timm.create_model("test_vit", img_size=IMG, num_classes=NUM_CLASSES, **kwargs).eval()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name != "delta.safetensors")


@torch.no_grad()
def test_single_file_loads_into_a_fresh_model_with_the_trained_logits(inputs, tmp_path):
    _, trained_model = inputs
    result = fps("merge", "--json")  # every default: ./delta.safetensors -> ./merged.safetensors
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["merged"] == "merged.safetensors" and summary["directory"] is False
    assert summary["dtype"] == "fp32"
    assert "fps merge: test_vit + delta.safetensors -> merged.safetensors (fp32)" in result.stderr
    expected = trained_model(images())

    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "merged.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    state = load_file(tmp_path / "merged.safetensors")
    assert all(t.dtype == torch.float32 for t in state.values())
    model = fresh()
    model.load_state_dict(state)  # strict: every tensor, no other
    torch.testing.assert_close(model(images()), expected, rtol=0, atol=1e-6)

    # timm's own loader, pointed at the file (num_classes in the overlay, or timm drops a head it thinks is new).
    file_cfg = {"file": str(tmp_path / "merged.safetensors"), "num_classes": NUM_CLASSES}
    via_timm = fresh(pretrained=True, pretrained_cfg_overlay=file_cfg)
    torch.testing.assert_close(via_timm(images()), expected, rtol=0, atol=1e-6)


@torch.no_grad()
def test_local_dir_loads_with_no_other_argument(inputs, tmp_path):
    import timm

    _, trained_model = inputs
    result = fps("merge", "-o", "export/", "-q")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("wrote export/ (timm local-dir: model)\n")
    assert sorted(p.name for p in (tmp_path / "export").iterdir()) == ["config.json", "model.safetensors"]
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "export").stat().st_mode & 0o777 == 0o777 & ~umask  # not mkdtemp's 0700
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["architecture"] == "test_vit"
    assert config["num_classes"] == NUM_CLASSES
    assert config["model_args"]["img_size"] == [IMG, IMG]
    assert config["pretrained_cfg"]["input_size"] == [3, IMG, IMG]
    assert config["label_names"] == ["class_0", "class_1", "class_2"]

    model = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    torch.testing.assert_close(model(images()), trained_model(images()), rtol=0, atol=1e-6)

    # An existing folder is a folder output too, even without the trailing slash; it needs --force once filled.
    again = fps("merge", "-o", "export", "-q")
    assert again.exit_code == 1
    assert (
        again.stderr == "error: export already holds model.safetensors and config.json; pass --force to replace them\n"
    )
    assert fps("merge", "-o", "export", "-q", "--force").exit_code == 0


def test_merging_twice_gives_identical_bytes(inputs, tmp_path):
    for out in ("a.safetensors", "b.safetensors", "a_dir/", "b_dir/"):
        assert fps("merge", "-o", out, "-q").exit_code == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "a_dir" / name).read_bytes() == (tmp_path / "b_dir" / name).read_bytes()
    assert (tmp_path / "a_dir" / "model.safetensors").read_bytes() == (tmp_path / "a.safetensors").read_bytes()


@torch.no_grad()
def test_bf16_and_fp16_weights(inputs, tmp_path):
    _, trained_model = inputs
    for dtype, torch_dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        result = fps("merge", "--dtype", dtype, "-o", f"{dtype}.safetensors", "--json", "-q")
        assert result.exit_code == 0, result.output
        state = load_file(tmp_path / f"{dtype}.safetensors")
        assert {t.dtype for t in state.values()} == {torch_dtype}
        model = fresh()
        model.load_state_dict(state)  # cast back to the model's fp32
        torch.testing.assert_close(model(images()), trained_model(images()), rtol=0.05, atol=0.05)
    sizes = {d: (tmp_path / f"{d}.safetensors").stat().st_size for d in ("bf16", "fp16")}
    assert fps("merge", "-q").exit_code == 0
    assert sizes["bf16"] < 0.6 * (tmp_path / "merged.safetensors").stat().st_size


@torch.no_grad()
def test_python_api(inputs):
    from fps_cli import load_merged, merge_into
    from fps_cli.errors import FileFormatError

    delta, trained_model = inputs
    model = load_merged(delta)
    torch.testing.assert_close(model(images()), trained_model(images()), rtol=0, atol=1e-6)

    with pytest.raises(FileFormatError, match="was trained on other base weights than VisionTransformer: the checksum"):
        merge_into(fresh(), delta)  # another random initialisation


# --------------------------------------------------------------------------------------------- bad input


def test_wrong_base_names_the_tensors(inputs, tmp_path):
    torch.manual_seed(123)
    save_file(fresh().state_dict(), tmp_path / "other.safetensors")
    result = fps("merge", "--checkpoint", "other.safetensors", "-q")
    assert result.exit_code == 1
    message = result.stderr
    assert message.startswith(
        "error: delta.safetensors was trained on other base weights than test_vit as loaded now: the checksum of the "
        "25 tensors it changes differs (blocks.0.attn.proj.weight, blocks.0.attn.qkv.weight, "
    )
    assert message.endswith("); pass the same --model / --checkpoint / --pretrained as when it was trained\n")
    assert "patch_embed.proj.weight" in message
    assert leftovers(tmp_path) == ["other.safetensors"]


def test_base_differing_only_in_untouched_tensors(inputs, tmp_path):
    from fps_cli.finetune import build_base, spec_from_provenance
    from fps_cli.formats import read_delta

    delta = read_delta("delta.safetensors")
    base = build_base(spec_from_provenance(delta.provenance), delta.shapes, delta.provenance, "d")
    state = base.state_dict()
    state["norm.weight"] = state["norm.weight"] + 1  # frozen, so not in the delta
    save_file(state, tmp_path / "other.safetensors")
    result = fps("merge", "--checkpoint", "other.safetensors", "-q")
    assert result.exit_code == 1
    assert result.stderr == (
        "error: delta.safetensors was trained on other base weights than test_vit as loaded now: the tensors it "
        "changes match, but the checksum of the other 28 parameters (head excluded) differs; pass the same --model "
        "/ --checkpoint / --pretrained as when it was trained\n"
    )
    assert leftovers(tmp_path) == ["other.safetensors"]


def test_mismatched_shapes(inputs, tmp_path):
    result = fps("merge", "--model", "test_vit2", "-q")
    assert result.exit_code == 1
    lines = result.stderr.splitlines()
    assert lines[0] == "error: delta.safetensors does not fit the model:"
    assert lines[1].startswith("  made for   test_vit (num_classes=3, img_size=32), ")
    assert lines[2].startswith("  built now  test_vit2 (num_classes=3, img_size=32), ")
    assert lines[3] == "  3 parameters the model lacks: cls_token, norm.weight, norm.bias"
    assert leftovers(tmp_path) == []


def test_bad_files(inputs, tmp_path):
    delta, _ = inputs
    data = delta.read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    cases = {
        "truncated.safetensors": "is not a readable safetensors file (truncated or corrupt?): ",
        "foreign.safetensors": "is a safetensors file but not an fps file (no fps.format in its header)",
        "text.safetensors": "is not a readable safetensors file (truncated or corrupt?): ",
        "missing.safetensors": "does not exist",
    }
    for name, text in cases.items():
        result = fps("merge", "--delta", name, "-q")
        assert result.exit_code == 1, name
        assert result.stderr.startswith(f"error: {name} {text}"), result.stderr
        assert len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "merged.safetensors").exists()


def test_a_mask_is_not_a_delta(trained, inputs, tmp_path):
    mask = trained[0].parent / "mask.safetensors"
    result = fps("merge", "--delta", mask, "-q")
    assert result.exit_code == 1
    assert result.stderr == f"error: {mask} is an fps mask file, but a delta file is needed here\n"


def test_outputs(inputs, tmp_path):
    cases = {
        (
            "-o",
            "nowhere/merged.safetensors",
        ): "cannot write nowhere/merged.safetensors: directory nowhere does not exist",
        ("-o", "nowhere/export/"): "cannot write nowhere/export/: directory nowhere does not exist",
        ("-o", "delta.safetensors/"): "cannot write the folder delta.safetensors/: delta.safetensors is a file",
    }
    for args, message in cases.items():
        result = fps("merge", *args, "-q")
        assert result.exit_code == 1, args
        assert result.stderr == f"error: {message}\n"
    # An output that is an input is a usage error (exit 2), naming both paths and the flags.
    clash = runner.invoke(app, ["merge", "-o", "delta.safetensors", "-q"], env={"COLUMNS": "300"})
    assert clash.exit_code == 2
    assert "--out delta.safetensors is also an input (--delta delta.safetensors)" in clash.stderr
    (tmp_path / "merged.safetensors").write_bytes(b"old")
    result = fps("merge", "-q")
    assert result.exit_code == 1
    assert result.stderr == "error: merged.safetensors already exists; pass --force to replace it\n"
    assert (tmp_path / "merged.safetensors").read_bytes() == b"old"
    assert fps("merge", "-q", "--force").exit_code == 0
    assert leftovers(tmp_path) == ["merged.safetensors"]
    assert fps("merge", "--dtype", "int8").exit_code == 2


def test_non_finite_result_writes_nothing(inputs, tmp_path):
    from fps_cli.formats import read_delta, save_delta

    delta = read_delta("delta.safetensors")
    name = "blocks.1.mlp.fc1.weight"
    delta.values[name][0] = float("nan")
    save_delta(tmp_path / "nan.safetensors", delta)
    result = fps("merge", "--delta", "nan.safetensors", "-o", "out/", "-q")
    assert result.exit_code == 1
    assert result.stderr == f"error: the merged weights hold NaN or infinite values in 1 tensors ({name})\n"

    delta.values[name][0] = 1e6  # finite in fp32, infinite in fp16
    save_delta(tmp_path / "big.safetensors", delta)
    assert fps("merge", "--delta", "big.safetensors", "-o", "big32.safetensors", "-q").exit_code == 0
    result = fps("merge", "--delta", "big.safetensors", "--dtype", "fp16", "-q")
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: the merged weights hold NaN or infinite values in 1 tensors ({name}); a float16 overflow? use "
        "--dtype bf16 or fp32\n"
    )
    assert leftovers(tmp_path) == ["big.safetensors", "big32.safetensors", "nan.safetensors"]
