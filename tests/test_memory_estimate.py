"""benchmarks/memory_estimate.py on test_vit: fps's own passes under fake tensors, DESIGN.md section 6's ratios."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import REPO


@pytest.fixture(scope="module")
def memory_estimate():
    spec = importlib.util.spec_from_file_location("memory_estimate", REPO / "benchmarks" / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_estimate_gives_the_fps_and_gps_ratios_on_test_vit(memory_estimate):
    model = ["--model", "test_vit", "--img-size", "32", "--batch-size", "16", "--budget", "0.05", "--precision", "fp32"]
    args = memory_estimate._args([*model, "--passes", "inference", "fps", "gps", "full", "sparse"])
    report = memory_estimate.estimate(args)
    peaks, ratios = report["fp32"]["peak_bytes"], report["fp32"]["ratios"]
    params = sum(p.numel() for p in memory_estimate._model(args).parameters()) * 4
    assert peaks["inference"] > params  # the weights and at least one activation
    assert ratios["fps_over_inference"] <= 1.10
    assert peaks["gps"] > peaks["fps"]
    assert peaks["sparse"] < peaks["full"]


def test_live_memory_counts_what_is_alive(memory_estimate):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), memory_estimate.LiveMemory() as memory:
        a = torch.empty(1000)  # 4000 bytes
        b = a * 2  # 8000
        view = b[:10]  # no new storage
        del a
        c = torch.empty(250)  # 1000: 9000 alive, below the peak
        del b, view, c
    assert memory.peak == 8000
    assert memory.current == 0
