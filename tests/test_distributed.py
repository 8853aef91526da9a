"""torchrun: several CPU processes (gloo) give the same mask as one process (DESIGN.md section 5)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_VIT

from fps_cli.distributed import Dist, batch_shard
from fps_cli.formats import read_mask


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fps(args: list[str], cwd: Path, nproc: int | None = None) -> subprocess.CompletedProcess:
    # One thread per process in both runs, so that each batch's forward pass is bitwise the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    launcher = [sys.executable, "-m", "fps_cli"]
    if nproc is not None:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(nproc),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            "-m",
            "fps_cli",
        ]
    return subprocess.run([*launcher, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.parametrize(("num_samples", "batch_size", "world"), [(15, 4, 2), (16, 4, 2), (3, 4, 2), (10, 3, 3)])
def test_batch_shards_cover_every_sample_once(num_samples, batch_size, world):
    shards = [batch_shard(num_samples, batch_size, Dist(rank, world)) for rank in range(world)]
    flat = sorted(i for shard in shards for batch in shard for i in batch)
    assert flat == list(range(num_samples))
    assert all(len(b) == batch_size for shard in shards for b in shard if num_samples - 1 not in b)


@pytest.mark.parametrize("method", [["--method", "fps"], ["--method", "gps", "--no-augment"]], ids=["fps", "gps"])
def test_two_processes_give_the_single_process_mask(tmp_path, image_folder, method):
    data = image_folder(classes=3, per_class=5)  # 15 images in batches of 4: the last shard is partial
    common = ["select", *TINY_VIT, "--data", str(data), "--budget", "0.05", "--num-workers", "0"]
    common += ["--batch-size", "4", "--device", "cpu", *method]
    one = run_fps([*common, "-o", "m1.safetensors", "--scores", "s1.safetensors", "-q"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_fps([*common, "-o", "m2.safetensors", "--scores", "s2.safetensors", "--json"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("{") == 1, "only rank 0 prints"
    assert "2 processes, 15 images in all" in two.stderr

    a, b = read_mask(tmp_path / "m1.safetensors"), read_mask(tmp_path / "m2.safetensors")
    assert a.indices.keys() == b.indices.keys()
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)
    assert a.provenance["num_samples"] == b.provenance["num_samples"] == 15
    # Byte-identical files: same tensors, same header (safetensors' header order is made canonical).
    for name in ("m1", "s1"):
        other = name.replace("1", "2")
        assert (tmp_path / f"{name}.safetensors").read_bytes() == (tmp_path / f"{other}.safetensors").read_bytes()


def test_a_failing_rank_takes_the_job_down_with_its_name(tmp_path, image_folder):
    data = image_folder(classes=2, per_class=4)
    (data / "class_1" / "img_000.png").write_bytes(b"broken")  # sample 4: batch 1 with batch size 4: rank 1
    r = run_fps(
        [
            "select",
            *TINY_VIT,
            "--data",
            str(data),
            "--budget",
            "0.05",
            "--num-workers",
            "0",
            "--batch-size",
            "4",
            "--device",
            "cpu",
        ],
        tmp_path,
        nproc=2,
    )
    assert r.returncode != 0
    assert "rank 1: error: cannot read image" in r.stderr
    assert not (tmp_path / "mask.safetensors").exists()


def test_two_process_training_matches_one_process_with_the_same_global_batch(tmp_path, image_folder):
    from fps_cli.formats import read_delta

    data = image_folder(classes=3, per_class=4, val_per_class=2)  # 12 training images: 3 global batches of 4
    select = run_fps(
        ["select", *TINY_VIT, "--data", str(data), "--budget", "0.05", "--num-workers", "0", "-q"], tmp_path
    )
    assert select.returncode == 0, select.stderr
    # SGD, not AdamW: the attention key bias has an exactly-zero true gradient, and Adam would turn each run's
    # rounding noise in it into full-size, run-dependent steps. The data-parallel code path is the same.
    common = ["train", "--epochs", "2", "--lr", "0.05", "--optimizer", "sgd", "--no-augment"]
    common += ["--num-workers", "0", "--device", "cpu", "--warmup-epochs", "0", "-q"]
    one = run_fps([*common, "--batch-size", "4", "-o", "d1.safetensors"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_fps([*common, "--batch-size", "2", "-o", "d2.safetensors", "--json"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    assert two.stdout.count("{") == two.stdout.count("}") and two.stdout.lstrip().startswith("{")
    assert not (tmp_path / "d2.ckpt").exists()

    a, b = read_delta(tmp_path / "d1.safetensors"), read_delta(tmp_path / "d2.safetensors")
    assert a.indices.keys() == b.indices.keys() and a.full.keys() == b.full.keys()
    moved = 0.0
    for name in a.values:
        assert torch.equal(a.indices[name], b.indices[name])
        torch.testing.assert_close(a.values[name], b.values[name], rtol=1e-4, atol=1e-6)
        moved += float(a.values[name].abs().sum())
    for name in a.full:
        torch.testing.assert_close(a.full[name], b.full[name], rtol=1e-4, atol=1e-6)
    assert moved > 0
    # Validation is gathered over ranks: both runs saw all 6 validation images.
    assert a.provenance["metrics"]["val_samples"] == b.provenance["metrics"]["val_samples"] == 6
    assert a.provenance["metrics"]["val_top1"] == b.provenance["metrics"]["val_top1"]
