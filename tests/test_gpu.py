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


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_sparse_path_on_cuda_follows_the_dense_path(precision):
    """cuSPARSE's sampled product and the overlay on the device give the dense path's gradients."""
    import timm

    from fps_cli import sparse

    dtype = {"fp32": None, "bf16": torch.bfloat16}[precision]
    x = torch.randn(4, 3, 32, 32, device="cuda")
    grads = {}
    for path in ("dense", "sparse"):
        torch.manual_seed(0)
        model = timm.create_model("test_vit", pretrained=False, num_classes=3, img_size=32).cuda()
        indices = {
            f"{n}.weight": torch.arange(0, m.weight.numel(), 7)
            for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and n != "head"
        }
        params = sparse.attach(model, indices, ["head.weight"], path=path)
        assert all(d.sparse_path == (path == "sparse") for d in params.deltas.values())
        with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
            model(x).float().square().mean().backward()
        grads[path] = {n: p.grad.float().cpu() for n, p in params.named_parameters()}
    tolerance = {"rtol": 1e-4, "atol": 1e-6} if dtype is None else {"rtol": 0.05, "atol": 1e-3}
    for name, value in grads["dense"].items():
        torch.testing.assert_close(grads["sparse"][name], value, **tolerance, msg=name)
