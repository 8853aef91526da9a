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
