"""``fps train`` and ``fps eval`` through the CLI: the short form end to end, and every bad input as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import CLASS_COLORS, TINY_VIT, write_images
from typer.testing import CliRunner

from fps_cli.cli import app

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]
QUIET = [*FAST, "-q"]
# What a finished run leaves beside its delta (the checkpoint is gone).
RECORDS = ["delta.args.yaml", "delta.metrics.jsonl", "delta.safetensors", "delta.summary.csv"]


def fps(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def selected(image_folder, tmp_path, monkeypatch) -> Path:
    """A mask of test_vit on a 3-class folder with a val split, at ./mask.safetensors; returns the data folder."""
    data = image_folder(classes=3, per_class=4, val_per_class=2)
    monkeypatch.chdir(tmp_path)
    result = fps("select", *TINY_VIT, "--data", data, "--budget", "0.05", "--num-workers", "0", "-q")
    assert result.exit_code == 0, result.output
    return data


def _outputs(tmp_path: Path, stem: str = "delta") -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((stem, f".{stem}")))


def test_select_train_eval_end_to_end(selected, tmp_path):
    result = fps("train", "--epochs", "2", "--lr", "1e-2", *FAST, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert summary["delta"] == "delta.safetensors"
    assert summary["epochs"] == 2
    assert summary["optimizer_state_elements"] == 2 * summary["trained"]
    assert {"train_loss", "val_top1", "val_loss"} <= set(summary["metrics"])
    assert "epoch 2 done: train loss" in result.stderr
    assert _outputs(tmp_path) == RECORDS  # the checkpoint is gone
    log = [json.loads(line) for line in (tmp_path / "delta.metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in log if r["event"] != "step"] == ["start", "epoch", "epoch", "end"]

    evaluated = fps("eval", "--num-workers", "0", "--json", "-q")
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["top1"] == summary["metrics"]["val_top1"]
    assert evaluated.stderr == ""

    human = fps("eval", "--num-workers", "0", "-q", "--split", "train")
    assert human.stdout.startswith("train: top-1 ")


def test_ctrl_c_then_resume_gives_the_same_delta(selected, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from fps_cli import finetune

    args = ["train", "--epochs", "2", "--seed", "1", *FAST, "-q"]
    assert fps(*args, "-o", "a.safetensors").exit_code == 0

    evaluate, calls = finetune.evaluate, []

    def interrupted_evaluate(*a, **k):  # Ctrl-C during the evaluation of epoch 2
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(finetune, "evaluate", interrupted_evaluate)
    result = fps(*args[:-1], "-o", "b.safetensors")
    assert result.exit_code == 130
    assert result.stderr.endswith(
        "the last complete epoch is in b.ckpt; continue with the same command and --resume\ninterrupted\n"
    )
    assert _outputs(tmp_path, "b") == ["b.args.yaml", "b.ckpt", "b.metrics.jsonl", "b.summary.csv"]
    monkeypatch.setattr(finetune, "evaluate", evaluate)

    result = fps(*args, "-o", "b.safetensors", "--resume")
    assert result.exit_code == 0, result.output
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a)
    epochs = [json.loads(x) for x in (tmp_path / "b.metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs if e["event"] == "epoch"] == [1, 2]  # the log reads as one run

    missing = fps(*args, "-o", "c.safetensors", "--resume")
    assert missing.exit_code == 1
    assert missing.stderr == "error: no checkpoint c.ckpt to resume from; run without --resume\n"


def test_wrong_architecture_lists_every_mismatch(selected, tmp_path):
    result = fps("train", "--model", "test_vit2", *FAST)
    assert result.exit_code == 1
    import timm

    lines = result.stderr.splitlines()[-6:]
    size = {
        m: sum(p.numel() for p in timm.create_model(m, num_classes=3, img_size=32).parameters())
        for m in ("test_vit", "test_vit2")
    }
    # The two models and their sizes first; then each kind of problem on its own line, the first names and a count.
    assert lines[:3] == [
        "error: mask.safetensors does not fit the model:",
        f"  made for   test_vit (num_classes=3, img_size=32), {size['test_vit']:,} parameters",
        f"  built now  test_vit2 (num_classes=3, img_size=32), {size['test_vit2']:,} parameters",
    ]
    assert lines[3] == "  3 parameters the model lacks: cls_token, norm.weight, norm.bias"
    assert lines[4] == (
        "  43 model parameters the file lacks: reg_token, blocks.0.ls1.gamma, blocks.0.ls2.gamma, blocks.1.ls1.gamma, "
        "blocks.1.ls2.gamma … 38 more"
    )
    assert lines[5].startswith("  build the model the file records (drop --model")
    assert "Traceback" not in result.output
    assert _outputs(tmp_path) == []


def test_other_image_size_is_a_shape_mismatch(selected, tmp_path):
    result = fps("train", "--img-size", "48", *QUIET)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[3] == "  1 shape mismatch (file vs model): pos_embed [1, 5, 64] vs [1, 10, 64]"
    assert _outputs(tmp_path) == []


def test_data_with_other_classes(selected, tmp_path):
    other = tmp_path / "four"
    for c in range(4):
        write_images(other / f"class_{c}", 2, CLASS_COLORS[c], seed=c)
    result = fps("train", "--data", other, *QUIET)
    assert result.exit_code == 1
    assert result.stderr == (
        f"error: {other} has 4 classes but mask.safetensors is for a 3-class head; pass --data with 3 class "
        "folders, or select a new mask on this folder\n"
    )
    assert _outputs(tmp_path) == []


def test_validation_split_with_unknown_classes(selected, tmp_path):
    write_images(selected / "val" / "zebra", 2, (0, 0, 0))
    result = fps("train", *QUIET)
    assert result.exit_code == 1
    assert result.stderr == f"error: {selected / 'val'} has classes the training split lacks: zebra\n"
    assert _outputs(tmp_path) == []


def test_nan_loss(selected, tmp_path):
    result = fps("train", "--lr", "1e30", "--epochs", "2", *FAST)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: loss is nan at epoch 1, step 2; training stopped. no epoch completed, so there is no checkpoint: "
        "rerun with a lower --lr, or set --clip-grad"
    )
    assert not (tmp_path / "delta.safetensors").exists()
    assert not (tmp_path / "delta.ckpt").exists()


def test_existing_outputs_need_force(selected, tmp_path):
    (tmp_path / "delta.safetensors").write_bytes(b"old")
    result = fps("train", *QUIET)
    assert result.exit_code == 1
    assert result.stderr == "error: delta.safetensors already exists; pass --force to replace it\n"
    assert (tmp_path / "delta.safetensors").read_bytes() == b"old"

    (tmp_path / "delta.safetensors").unlink()
    (tmp_path / "delta.ckpt").write_bytes(b"old")
    result = fps("train", *QUIET)
    assert result.exit_code == 1
    assert result.stderr == (
        "error: delta.ckpt exists (an interrupted run?); pass --resume to continue it or --force to start over\n"
    )

    result = fps("train", "--epochs", "1", *FAST, "--force", "-q")
    assert result.exit_code == 0, result.output
    assert _outputs(tmp_path) == RECORDS


def test_usage_errors_exit_2(selected):
    assert fps("train", "--optimizer", "lamb").exit_code == 2
    assert fps("train", "--epochs", "0").exit_code == 2
    assert fps("train", "--lr", "0").exit_code == 2


def test_without_a_c_compiler_training_says_so_once_and_trains(selected, tmp_path, monkeypatch):
    """fps's CPU kernel for the sparse gradients cannot be built: one warning line before the first step, torch's
    kernel trains, stdout stays one JSON object."""
    from fps_cli import sampled_product

    monkeypatch.setattr(sampled_product, "_functions", None)
    monkeypatch.setattr(sampled_product, "_failure", None)
    monkeypatch.setenv("FPS_CACHE_DIR", str(tmp_path / "kernel-cache"))
    monkeypatch.setenv("CC", "/nonexistent/cc")
    result = fps("train", "--epochs", "1", *FAST, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["epochs"] == 1
    lines = [line for line in result.stderr.splitlines() if "CPU kernel" in line]
    assert lines == [
        "warning: fps's CPU kernel for the sparse gradients is not available (/nonexistent/cc could not run: "
        "[Errno 2] No such file or directory: '/nonexistent/cc'); using torch's sparse_sampled_addmm: the same "
        "gradients, slower steps (install a C compiler, or set FPS_SAMPLED_PRODUCT=torch to choose torch's kernel "
        "without this warning)"
    ]


def test_an_unknown_kernel_choice_is_a_usage_error_before_any_work(selected, tmp_path, monkeypatch):
    monkeypatch.setenv("FPS_SAMPLED_PRODUCT", "tourch")
    result = runner.invoke(app, ["train", "--epochs", "1", *FAST], env={"COLUMNS": "300"})  # the box would wrap
    assert result.exit_code == 2, result.output
    assert "FPS_SAMPLED_PRODUCT='tourch': expected fps (the default) or torch" in result.stderr
    assert _outputs(tmp_path) == []
