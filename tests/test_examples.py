"""The README's set-up command and the examples run as documented."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import REPO


def _example(name: str):
    """Import ``examples/<name>.py`` as a module (the examples folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _val_top1(result) -> float:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)["metrics"]["val_top1"]


def test_quickstart_recipe_learns_more_than_the_head_alone(tmp_path, monkeypatch):
    """The quickstart's learning steps, in process and at its settings: pretrain on digits 0-4, then a 5% FPS mask
    fine-tuned on digits 5-9 beats chance and the head alone (measured: 75.0% vs 57.5%, chance 20%)."""
    import torch
    from typer.testing import CliRunner

    from fps_cli.cli import app

    torch.set_num_threads(1)  # as the script (OMP_NUM_THREADS=1): fast on busy cores; conftest restores it
    digits, pretrain = _example("make_digits"), _example("pretrain_digits")
    digits.write_digits(tmp_path / "source", [0, 1, 2, 3, 4], per_class_train=140, per_class_val=30)
    digits.write_digits(tmp_path / "target", [5, 6, 7, 8, 9], per_class_train=20, per_class_val=40)
    pretrain.pretrain(tmp_path / "source", tmp_path / "source.safetensors", epochs=30)
    monkeypatch.chdir(tmp_path)
    model = ["--model", "test_vit", "--checkpoint", "source.safetensors", "--img-size", "32", "--data", "target"]
    train = ["--epochs", "12", "--lr", "0.03", "--no-augment", "--num-workers", "0", "--json", "-q"]
    runner = CliRunner()
    r = runner.invoke(app, ["select", *model, "--budget", "0.05", "--num-workers", "0", "--no-scores", "-q"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["select", *model, "--method", "linear", "-o", "linear.safetensors", "-q"])
    assert r.exit_code == 0, r.output
    sparse = _val_top1(runner.invoke(app, ["train", *train]))
    head = _val_top1(
        runner.invoke(app, ["train", "--mask", "linear.safetensors", "-o", "linear_delta.safetensors", *train])
    )
    chance = 20.0
    assert sparse > chance + 30, (sparse, head)
    assert sparse > head + 5, (sparse, head)


@pytest.mark.slow
def test_quickstart_script_runs_end_to_end(tmp_path):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", str(REPO / "examples" / "quickstart.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for output in ("mask.safetensors", "mask_2pct.safetensors", "delta.safetensors", "merged/model.safetensors"):
        assert (tmp_path / output).exists(), output
    assert "selected entries in" in r.stdout
    assert "merged folder reproduces the fine-tuned model" in r.stdout
    last = r.stdout.strip().splitlines()[-1]
    found = re.fullmatch(
        r"val top-1 on digits 5-9: fps mask \(5% trainable\) ([\d.]+)% \| head only ([\d.]+)% \| chance ([\d.]+)%", last
    )
    assert found, last
    sparse, head, chance = map(float, found.groups())
    assert chance == 20.0
    assert sparse > chance + 30 and sparse > head + 5, last


def test_readme_names_the_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && pytest' in readme
    assert 'pip install -e ".[dev]"' in ci and "\npytest" in ci
    assert 'pip install -e ".[examples]" && bash examples/quickstart.sh' in readme
