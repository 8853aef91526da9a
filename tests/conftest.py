"""Shared fixtures: seeded torch defaults, tiny models and generated image folders."""

from __future__ import annotations

import atexit
import gc
import os
import shutil
import subprocess
import tempfile
import time

# One BLAS / OpenMP thread per process (this one and every fps subprocess a test starts): the models here are tiny,
# and on a busy 2-core machine threads of several processes spinning against each other made single tests 100x
# slower. Set before torch is imported; a value given in the environment wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CPU sampled-product kernel (fps_cli/sampled_product.py) is built into this session's own cache, not the
# user's ~/.cache/fps; every fps subprocess a test starts inherits it.
if "FPS_CACHE_DIR" not in os.environ:
    os.environ["FPS_CACHE_DIR"] = tempfile.mkdtemp(prefix="fps-test-cache-")
    atexit.register(shutil.rmtree, os.environ["FPS_CACHE_DIR"], True)

import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
DIGITS = REPO / "examples" / "digits"

# The model every CLI test uses: timm's tiny test_vit at 32x32 (4 patches), randomly initialised.
TINY_VIT = ["--model", "test_vit", "--no-pretrained", "--img-size", "32"]


@pytest.fixture(autouse=True)
def _torch_defaults():
    """Seed everything, and restore torch's global state a test may change."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch, tmp_path_factory):
    """No test may reach a hub: an empty HF cache and an endpoint that refuses connections at once."""
    cache = tmp_path_factory.mktemp("hf_home")
    monkeypatch.setenv("HF_HOME", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(cache / "torch"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    # `--offline` sets HF_HUB_OFFLINE for the rest of a CLI process; in-process CLI tests must not inherit it.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache / "hub"))


def write_images(folder: Path, n: int, color: tuple[int, int, int] | None = None, size: int = 32, seed: int = 0):
    """Write ``n`` PNG images to ``folder``: noise around ``color`` (a separable class), or pure noise."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        noise = rng.integers(0, 256, (size, size, 3))
        pixels = noise if color is None else np.clip(np.array(color) + (noise - 128) * 0.25, 0, 255)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"img_{i:03d}.png")


CLASS_COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (220, 220, 40)]


def tiny_hf_vit(folder: Path | None = None, *, layers: int = 2):
    """A tiny random transformers ViT (hidden 32, ``layers`` layers, 2 heads, 32x32 images, 8x8 patches, 3 labels);
    with ``folder``, saved there as a ``save_pretrained`` folder with its image processor (an ``hf:`` model)."""
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    model = ViTForImageClassification(config)
    if folder is not None:
        model.save_pretrained(folder)
        ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return model


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``image_folder(classes=3, per_class=6, val_per_class=0, flat=False)`` -> a data folder.

    Each class is noise around its own colour, so a model can learn it quickly.
    """

    def make(classes: int = 3, per_class: int = 6, val_per_class: int = 0, flat: bool = False) -> Path:
        root = tmp_path / "data"
        if flat:
            write_images(root, per_class)
            return root
        train_root = root / "train" if val_per_class else root
        for c in range(classes):
            color = CLASS_COLORS[c % len(CLASS_COLORS)]
            write_images(train_root / f"class_{c}", per_class, color, seed=c)
            if val_per_class:
                write_images(root / "val" / f"class_{c}", val_per_class, color, seed=100 + c)
        return root

    return make


class TinyMLP(nn.Module):
    """A hand-written 3-layer MLP whose scores can be computed by hand; ``head`` is the task head."""

    def __init__(self, dims: tuple[int, ...] = (6, 5, 4), num_classes: int = 3) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1])
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(dims[1], dims[2])
        self.head = nn.Linear(dims[2], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))

    def get_classifier(self) -> nn.Module:
        return self.head


@pytest.fixture
def tiny_mlp() -> TinyMLP:
    return TinyMLP()


# ------------------------------------------------------------------------- OS-level helpers (output-safety tests)


@pytest.fixture
def tmpfs(tmp_path):
    """A small tmpfs (root only), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs for the full-disk and read-only cases needs root")
    mounted = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        mounted.append(where)
        return where

    yield mount
    gc.collect()  # a file a failed write left open keeps the mount busy
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def wait_stopped(pid: int) -> None:
    """Wait until process ``pid`` is stopped (SIGSTOP at a test's chosen point: ``/proc/PID/stat`` state ``T``)."""
    for _ in range(3000):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("T"):
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never reached its stop point")
