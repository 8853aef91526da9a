"""CUDA paths (``pytest -m gpu``; skipped without a GPU): selection, GPS, training and merge on the device."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_VIT
from typer.testing import CliRunner

from fps_cli.cli import app
from fps_cli.formats import read_mask, read_scores

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
runner = CliRunner()


def fps(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_select_on_cuda_matches_cpu_statistics(tmp_path, image_folder):
    data = image_folder(classes=3, per_class=6)
    common = ["select", *TINY_VIT, "--data", data, "--budget", "0.05", "--num-workers", "2", "-q"]
    cpu = fps(*common, "--device", "cpu", "-o", tmp_path / "m_cpu.safetensors", "--scores", tmp_path / "s_cpu.st")
    gpu = fps(*common, "--device", "cuda", "-o", tmp_path / "m_gpu.safetensors", "--scores", tmp_path / "s_gpu.st")
    assert cpu.exit_code == 0 and gpu.exit_code == 0, cpu.output + gpu.output
    a, _ = read_scores(tmp_path / "s_cpu.st")
    b, _ = read_scores(tmp_path / "s_gpu.st")
    for name in a:
        torch.testing.assert_close(a[name].abs_sum, b[name].abs_sum, rtol=1e-4, atol=1e-5)
    ma, mb = read_mask(tmp_path / "m_cpu.safetensors"), read_mask(tmp_path / "m_gpu.safetensors")
    assert ma.selected == mb.selected


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_select_gps_train_merge_on_cuda(tmp_path, image_folder, monkeypatch, precision):
    monkeypatch.chdir(tmp_path)
    data = image_folder(classes=3, per_class=6, val_per_class=2)
    for method in (["--method", "gps", "--no-augment", "-o", "gps.safetensors", "--no-scores"], []):
        r = fps(
            "select",
            *TINY_VIT,
            "--data",
            data,
            "--budget",
            "0.05",
            "--device",
            "cuda",
            "--precision",
            precision,
            "--num-workers",
            "2",
            "-q",
            *method,
        )
        assert r.exit_code == 0, r.output
    r = fps("train", "--epochs", "1", "--device", "cuda", "--precision", precision, "--num-workers", "2", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["val_samples"] == 6
    assert fps("merge", "-q").exit_code == 0
