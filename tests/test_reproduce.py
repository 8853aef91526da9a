"""benchmarks/reproduce.py end to end on a tiny fake task (test_vit, one epoch), and its resume logic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import CLASS_COLORS, REPO, write_images
from typer.testing import CliRunner

from fps_cli.cli import app

sys.path.insert(0, str(REPO / "benchmarks"))
import reproduce

ARGS = ["--model", "test_vit", "--no-pretrained", "--img-size", "32", "--epochs", "1", "--warmup-epochs", "0"]
ARGS += ["--device", "cpu", "--num-workers", "0", "--batch-size", "4"]


def in_process(calls: list[list[str]]):
    """The runner used here: the same CLI commands, in this process (no interpreter start-up per command)."""
    runner = CliRunner()

    def run(command: list[str], log: Path) -> dict:
        calls.append(command)
        result = runner.invoke(app, command)
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    return run


@pytest.fixture
def root(tmp_path: Path) -> Path:
    for c in range(2):
        write_images(tmp_path / "data" / "fake_task" / "train" / f"class_{c}", 4, CLASS_COLORS[c], seed=c)
        write_images(tmp_path / "data" / "fake_task" / "test" / f"class_{c}", 2, CLASS_COLORS[c], seed=10 + c)
    return tmp_path / "data"


def test_reproduce_runs_every_cell_then_skips_finished_ones(root, tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["--root", str(root), "--tasks", "fake_task", "--methods", "fps", "linear", *ARGS, "--out-dir", str(out)]
    calls: list[list[str]] = []
    first = reproduce.main(argv, runner=in_process(calls))
    assert [c[0] for c in calls] == ["select", "train", "eval"] * 2
    assert [r["status"] for r in first] == ["ran select, train, eval"] * 2
    assert all(0 <= r["top1"] <= 100 for r in first)
    fps_select = calls[0]
    assert fps_select[fps_select.index("--topk-per-neuron") + 1] == "1"  # DEFAULT_RECIPE for an unknown task
    assert fps_select[fps_select.index("--data") + 1] == str(root / "fake_task" / "train")
    table = (out / "results.md").read_text()
    assert table.startswith("| task | fps | linear | published (GPS paper) |")
    assert "| fake_task | " in table and table in capsys.readouterr().out

    calls.clear()
    second = reproduce.main(argv, runner=in_process(calls))
    assert calls == []  # every cell finished: nothing runs again
    assert [r["status"] for r in second] == ["skipped (finished)"] * 2
    assert [r["top1"] for r in second] == [r["top1"] for r in first]

    # A cell interrupted after its selection: the mask is reused, training and evaluation run again.
    (out / "fake_task" / "linear" / "result.json").unlink()
    (out / "fake_task" / "linear" / "delta.safetensors").unlink()
    third = reproduce.main(argv, runner=in_process(calls))
    assert [c[0] for c in calls] == ["train", "eval"]
    assert third[1]["status"] == "ran train, eval"


def test_plan_resumes_an_interrupted_training(tmp_path):
    cell = tmp_path / "cell"
    cell.mkdir()
    assert reproduce.plan(cell) == ["select", "train", "eval"]
    (cell / "mask.safetensors").touch()
    (cell / "delta.ckpt").touch()  # an epoch finished, then the run stopped
    assert reproduce.plan(cell) == ["resume", "eval"]
    (cell / "delta.safetensors").touch()
    assert reproduce.plan(cell) == ["eval"]
    (cell / "result.json").touch()
    assert reproduce.plan(cell) == []


def test_commands_follow_the_gps_recipe(tmp_path):
    args = reproduce.parse_args(["--root", str(tmp_path), "--lr", "full=1e-5"])
    commands = reproduce.cell_commands("cub_2011", "gps", tmp_path / "cub_2011", tmp_path / "cell", args)
    train = commands["train"]
    assert train[train.index("--lr") + 1] == "0.003" and train[train.index("--batch-size") + 1] == "32"
    assert train[train.index("--weight-decay") + 1] == "0" and train[train.index("--epochs") + 1] == "100"
    assert train[train.index("--label-smoothing") + 1] == "0.1" and "--no-augment" not in train  # FGVC
    assert commands["select"][commands["select"].index("--topk-per-neuron") + 1] == "2"
    assert commands["resume"][-1] == "--resume"
    full = reproduce.cell_commands("svhn", "full", tmp_path / "svhn", tmp_path / "cell", args)
    assert full["train"][full["train"].index("--lr") + 1] == "1e-05" and "--no-augment" in full["train"]
    assert "--topk-per-neuron" not in full["select"] and "--budget" not in full["select"]


def test_prepare_vtab_links_list_files_into_class_folders(tmp_path):
    src = tmp_path / "vtab-1k" / "dtd"
    write_images(src / "images", 3)
    (src / "train800val200.txt").write_text("images/img_000.png 0\nimages/img_001.png 12\n")
    (src / "test.txt").write_text("images/img_002.png 0\n")
    dst = tmp_path / "root" / "dtd"
    reproduce.main(["--prepare-vtab", str(src), str(dst)])
    assert sorted(p.relative_to(dst).as_posix() for p in dst.rglob("*.png")) == [
        "test/000/img_002.png",
        "train/000/img_000.png",
        "train/012/img_001.png",
    ]
    assert (dst / "train" / "012" / "img_001.png").resolve() == (src / "images" / "img_001.png").resolve()
