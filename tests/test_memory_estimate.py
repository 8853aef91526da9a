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


def test_the_estimate_runs_a_llama_from_its_config_alone(memory_estimate):
    args = memory_estimate._args(
        ["--model", "tiny-llama", "--seq-len", "32", "--lora-r", "2", "--checkpointing", "off"]
    )
    assert args.batch_size == 4 and args.passes == list(memory_estimate.LLM_PASSES)
    report = memory_estimate.estimate_llm(args)
    peaks = report["no_checkpointing"]["peak_bytes"]
    shape = memory_estimate.LLM_SHAPES["tiny-llama"]
    # LoRA r=2 on q (64 -> 64) and v (64 -> 32) in 2 layers: the count every variant trains.
    assert report["trainable"] == 2 * 2 * ((64 + 64) + (64 + 32))
    weights = report["params"] * 2  # bf16
    assert report["params"] > shape["vocab_size"] * shape["hidden_size"]
    assert peaks["inference"] > weights
    assert peaks["inference_last"] <= peaks["inference"]  # the [4, 32, 512] logits not made
    assert peaks["full"] > 3 * weights  # weights, gradients, two AdamW states
    assert peaks["sparse"] < peaks["full"] and peaks["lora"] < peaks["full"]
    ratios = report["no_checkpointing"]["ratios"]
    assert ratios["fps_over_inference"] == peaks["fps"] / peaks["inference"]


def test_a_vision_pass_is_refused_for_a_language_model(memory_estimate, capsys):
    with pytest.raises(SystemExit):
        memory_estimate._args(["--model", "tiny-llama", "--passes", "gps"])
    assert "--passes gps not available for tiny-llama" in capsys.readouterr().err
