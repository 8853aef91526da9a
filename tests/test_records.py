"""``fps train``'s run records a timm user knows: summary.csv and args.yaml beside the delta, and --log-wandb."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_VIT
from typer.testing import CliRunner

from fps_cli.cli import app

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]


def fps(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture
def selected(image_folder, tmp_path, monkeypatch) -> Path:
    """A mask of test_vit on a 5-class folder with a val split (so top-5 exists), at ./mask.safetensors."""
    data = image_folder(classes=5, per_class=2, val_per_class=1)
    monkeypatch.chdir(tmp_path)
    result = fps("select", *TINY_VIT, "--data", data, "--budget", "0.05", "--num-workers", "0", "-q")
    assert result.exit_code == 0, result.output
    return data


def _summary(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_summary_csv_has_timms_columns_and_the_metrics_logs_rows(selected, tmp_path):
    result = fps("train", "--epochs", "3", "--lr", "1e-2", *FAST, "-q", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["summary"] == "delta.summary.csv" and payload["args"] == "delta.args.yaml"
    header = (tmp_path / "delta.summary.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,eval_loss,eval_top1,eval_top5,lr,train_top1,step,seconds"
    rows = _summary(tmp_path / "delta.summary.csv")
    log = [json.loads(line) for line in (tmp_path / "delta.metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in log if r["event"] == "epoch"]
    assert len(rows) == len(epochs) == 3
    for row, record in zip(rows, epochs, strict=True):
        assert int(row["epoch"]) == record["epoch"]
        assert int(row["step"]) == record["step"]
        for column, key in [("train_loss", "train_loss"), ("eval_loss", "val_loss"), ("eval_top1", "val_top1")]:
            assert float(row[column]) == record[key]  # csv writes repr(float): exact round trip
        assert float(row["eval_top5"]) == record["val_top5"]
        assert float(row["lr"]) == record["lr"]
    assert float(rows[-1]["eval_top1"]) == payload["metrics"]["val_top1"]


def test_args_yaml_holds_the_resolved_arguments(selected, tmp_path):
    result = fps("train", "--epochs", "1", "--lr", "0.02", *FAST, "-q")
    assert result.exit_code == 0, result.output
    args = yaml.safe_load((tmp_path / "delta.args.yaml").read_text())
    # Given on the command line, taken from the defaults, and filled in from what the mask records.
    assert args["lr"] == 0.02 and args["epochs"] == 1 and args["batch_size"] == 4
    assert args["weight_decay"] == 1e-4 and args["optimizer"] == "adamw"
    assert args["model"] == "test_vit" and args["pretrained"] is False
    assert args["num_classes"] == 5 and args["img_size"] == 32
    assert Path(args["data"]).resolve() == selected.resolve()
    assert args["mask"] == "mask.safetensors" and args["device"] == "cpu"


def test_records_need_force_and_resume_keeps_one_row_per_epoch(selected, tmp_path, monkeypatch):
    (tmp_path / "delta.summary.csv").write_text("old")
    result = fps("train", "--epochs", "1", *FAST, "-q")
    assert result.exit_code == 1
    assert result.stderr == "error: delta.summary.csv already exists; pass --force to replace it\n"

    from fps_cli import finetune

    evaluate, calls = finetune.evaluate, []

    def interrupted_evaluate(*a, **k):  # Ctrl-C during the evaluation of epoch 2
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return evaluate(*a, **k)

    monkeypatch.setattr(finetune, "evaluate", interrupted_evaluate)
    assert fps("train", "--epochs", "2", *FAST, "-q", "--force").exit_code == 130
    assert [r["epoch"] for r in _summary(tmp_path / "delta.summary.csv")] == ["1"]
    monkeypatch.setattr(finetune, "evaluate", evaluate)
    result = fps("train", "--epochs", "2", *FAST, "-q", "--resume")
    assert result.exit_code == 0, result.output
    assert [r["epoch"] for r in _summary(tmp_path / "delta.summary.csv")] == ["1", "2"]


def test_log_wandb_without_the_package_names_the_extra(selected, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError
    result = fps("train", "--epochs", "1", *FAST, "--log-wandb")
    assert result.exit_code == 1
    assert result.stderr == "error: --log-wandb needs the wandb package: pip install 'fps-cli[wandb]'\n"
    assert not (tmp_path / "delta.safetensors").exists()


def test_log_wandb_offline_logs_every_epoch(selected, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    result = fps("train", "--epochs", "2", *FAST, "-q", "--log-wandb")
    assert result.exit_code == 0, result.output
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    files = {p.name for p in runs[0].rglob("*")}
    assert any(name.endswith(".wandb") for name in files), files


# --------------------------------------------------------------- hand-edited records of an interrupted run (issue 18)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A 2-epoch run stopped by Ctrl-C during epoch 2: delta.ckpt, log and records of epoch 1 (and a val split)."""
    from conftest import CLASS_COLORS, write_images

    from fps_cli import finetune

    root = tmp_path_factory.mktemp("interrupted")
    for c in range(3):
        write_images(root / "data" / "train" / f"class_{c}", 2, CLASS_COLORS[c], seed=c)
        write_images(root / "data" / "val" / f"class_{c}", 1, CLASS_COLORS[c], seed=100 + c)
    run = root / "run"
    run.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(run)
        assert fps("select", *TINY_VIT, "--data", root / "data", "--budget", "0.05", *FAST, "-q").exit_code == 0
        evaluate, calls = finetune.evaluate, []

        def interrupted_evaluate(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return evaluate(*a, **k)

        mp.setattr(finetune, "evaluate", interrupted_evaluate)
        assert fps("train", "--epochs", "2", *FAST, "-q").exit_code == 130
    assert (run / "delta.ckpt").is_file()
    return run


@pytest.fixture
def resumable(interrupted, tmp_path, monkeypatch) -> Path:
    import shutil

    shutil.copytree(interrupted.parent, tmp_path / "copy")
    monkeypatch.chdir(tmp_path / "copy" / "run")
    return tmp_path / "copy" / "run"


def _resume_error(run: Path) -> tuple[str, dict]:
    """`fps train --resume --json`: exit 1, one error line on stderr, one JSON error object on stdout."""
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    result = fps("train", "--epochs", "2", *FAST, "-q", "--resume", "--json")
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    payload = json.loads(result.stdout)
    assert payload == {"error": lines[0].removeprefix("error: "), "exit_code": 1}
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written
    return lines[0], payload


LOG_FIX = (
    "; fix or delete that line (or the whole log: the resumed log then starts at the checkpoint), or start over "
    "with --force"
)


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (b"5", "is not a JSON object: 5"),
        (b'[{"event": "epoch", "epoch": 1}]', 'is not a JSON object: [{"event": "epoch", "epoch": 1}]'),
        (b'{"event": "epoch", "epoch": "x"}', 'has "epoch": "x", not a whole number'),
        (b'{"event": "epoch", "epoch": null}', 'has "epoch": null, not a whole number'),
        (b'{"event": "epoch", "epoch": true}', 'has "epoch": true, not a whole number'),
        (b"{not json", "is not JSON (Expecting property name enclosed in double quotes: column 2)"),
    ],
)
def test_resume_with_a_hand_edited_metrics_log_line_is_one_error(resumable, line, problem):
    log = resumable / "delta.metrics.jsonl"
    n = len(log.read_bytes().splitlines()) + 1
    log.write_bytes(log.read_bytes() + line + b"\n")
    message, _ = _resume_error(resumable)
    assert message == f"error: delta.metrics.jsonl line {n} {problem}{LOG_FIX}"


def test_resume_with_binary_bytes_in_the_metrics_log_is_one_error(resumable):
    log = resumable / "delta.metrics.jsonl"
    size = len(log.read_bytes())
    log.write_bytes(log.read_bytes() + b"\xff\xfe\x00\x01\n")
    message, _ = _resume_error(resumable)
    assert message == (
        f"error: delta.metrics.jsonl is not UTF-8 text (byte 0xff at offset {size}); fix or delete the file, or "
        "start over with --force"
    )


def _edit_csv(path: Path, how: str) -> None:
    text = path.read_bytes()
    header, first = text.splitlines()[:2]
    edits = {
        "non-integer epoch": b"\n".join([header, b"one" + first[first.index(b",") :]]) + b"\n",
        "no epoch column": b"\n".join([header.replace(b"epoch,", b"", 1), first[first.index(b",") + 1 :]]) + b"\n",
        "dropped column": b"\n".join([header, first.rsplit(b",", 1)[0]]) + b"\n",
        "NUL": text.replace(b",", b",\0", 1),
        "bad UTF-8": text + b"\xff\xfe\n",
    }
    path.write_bytes(edits[how])


@pytest.mark.parametrize("how", ["non-integer epoch", "no epoch column", "dropped column", "NUL", "bad UTF-8"])
def test_resume_rebuilds_a_hand_edited_summary_from_the_checkpoint(interrupted, resumable, tmp_path, how):
    """summary.csv is never read back: a resumed run writes it from the checkpoint's history of epochs."""
    _edit_csv(resumable / "delta.summary.csv", how)
    result = fps("train", "--epochs", "2", *FAST, "-q", "--resume", "--json")
    assert result.exit_code == 0, result.output
    rows = (resumable / "delta.summary.csv").read_text().splitlines()
    original = (interrupted / "delta.summary.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[:2] == original  # the header and epoch 1 as first written, then epoch 2
    assert rows[2].startswith("2,")


def _edit_checkpoint(path: Path, **changes) -> None:
    import torch

    state = torch.load(path, weights_only=True)
    state.update(changes)
    torch.save(state, path)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"epoch": "x"}, "its epoch is 'x', not a whole number"),
        ({"epoch": 50}, "its epoch 50 is past the run's 2 epochs"),
        ({"epoch": 2}, "its history holds 1 epoch, not 2"),
        ({"history": "x"}, "its history is not a list of epoch records"),
        ({"config": None}, "it records no training configuration"),
        ({"trainable": "x"}, "its trainable values are not a mapping of tensors"),
        ({"optimizer": [1], "rng": None}, "it lacks its optimizer, rng state"),
    ],
)
def test_resume_from_a_crafted_checkpoint_is_one_error(resumable, changes, problem):
    _edit_checkpoint(resumable / "delta.ckpt", **changes)
    message, _ = _resume_error(resumable)
    assert message == f"error: delta.ckpt is not a valid fps training checkpoint: {problem}; start over with --force"


def test_resume_from_a_checkpoint_whose_states_do_not_fit_is_one_error(resumable):
    _edit_checkpoint(resumable / "delta.ckpt", optimizer={"state": {}, "param_groups": []})
    message, _ = _resume_error(resumable)
    assert message.startswith("error: the training checkpoint cannot be restored (")
    assert message.endswith("); start over with --force")
