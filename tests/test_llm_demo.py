"""examples/llm_demo.py's recipe on made-up text, in seconds: pretrain a tiny Llama, fine-tune with fps, LoRA and
the norms alone, perplexity before and after."""

from __future__ import annotations

import importlib.util
import math
import random

import torch
from conftest import REPO


def _demo():
    spec = importlib.util.spec_from_file_location("llm_demo", REPO / "examples" / "llm_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ANIMALS = ["cat", "dog", "bird", "fox", "cow", "owl"]
PLACES = ["mat", "tree", "house", "river", "barn", "hill"]


def _sentences(rng: random.Random, n: int) -> list[str]:
    """Pretraining: any animal by any place."""
    return [f"the {rng.choice(ANIMALS)} sat by the {rng.choice(PLACES)} and slept" for _ in range(n)]


def _habits(rng: random.Random, n: int) -> list[str]:
    """Fine-tuning: the same words, but every animal has its own place."""
    out = []
    for _ in range(n):
        i = rng.randrange(len(ANIMALS))
        out.append(f"the {ANIMALS[i]} sat by the {PLACES[i]} and slept")
    return out


def test_the_demo_recipe_learns_on_made_up_text():
    demo = _demo()
    rng = random.Random(0)
    torch.set_num_threads(1)  # conftest restores it
    args = demo._args(
        ["--pretrain-steps", "60", "--pretrain-lr", "1e-2", "--finetune-steps", "40", "--seq-len", "32",
         "--batch-size", "8", "--hidden", "32", "--layers", "2", "--vocab-size", "300", "--lora-r", "2",
         "--fps-lr", "0.1", "--lora-lr", "0.1", "--norm-lr", "0.1"]
    )  # fmt: skip
    report = demo.run(_sentences(rng, 400), _habits(rng, 300), args)
    methods = report["methods"]
    assert set(methods) == {"lora", "fps", "norm"}
    # fps trains as many weights as LoRA (its budget rounds to within one entry); the norms alone, what they are.
    assert abs(methods["fps"]["trainable"] - methods["lora"]["trainable"]) <= 1
    assert methods["norm"]["trainable"] == (2 * 2 + 1) * 32
    for method, result in methods.items():
        assert math.isfinite(result["perplexity"]), method
    # Measured: before 2.70; fps 2.53, LoRA 2.67, norms 1.76 (each animal's place is the only thing to learn).
    assert methods["fps"]["perplexity"] < 0.97 * report["before"], report
    assert methods["norm"]["perplexity"] < report["before"], report
