"""Causal language models through the real CLI: select / train / eval / merge / export on a tiny random Llama saved
with a tokenizer built here, statistics over real tokens, and the bad inputs as one error line."""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_llm import make_tokenizer, save_tiny_llama
from typer.testing import CliRunner

from fps_cli.cli import app
from fps_cli.formats import read_delta, read_mask

runner = CliRunner()
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight"]


def fps(*args: object, cwd: Path):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    finally:
        os.chdir(old)


def ok(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


def write_sums(path: Path, n: int = 48, seed: int = 0) -> Path:
    """Prompt / completion additions in words, of different lengths (so batches pad)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            a, b = rng.randint(1, 4), rng.randint(1, 4)
            prompt = f"what is {NUMBERS[a - 1]} plus {NUMBERS[b - 1]}" + " answer" * rng.randint(0, 3)
            f.write(json.dumps({"prompt": prompt, "completion": NUMBERS[a + b - 1]}) + "\n")
    return path


@pytest.fixture
def work(tmp_path: Path) -> Path:
    save_tiny_llama(tmp_path / "llm")
    write_sums(tmp_path / "sums.jsonl")
    return tmp_path


def test_select_train_eval_merge_export_end_to_end(work):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    select = ok(fps("select", "--model", "hf:llm", "--data", "sums.jsonl", "--budget", "0.05", "--val-split", "0.25",
                    "--json", "-q", cwd=work))  # fmt: skip
    mask = read_mask(work / "mask.safetensors")
    # The decoder's Linear layers only: the (tied) embedding / lm_head is no candidate and not trained in full.
    assert sorted({n.split(".")[-2] for n in mask.indices}) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert mask.fully_trainable == [] and mask.provenance["task"] == "causal-lm"
    assert select["selected"] == round(0.05 * mask.total_params)

    train = ok(fps("train", "--epochs", "3", "--lr", "0.02", "--batch-size", "8", "--json", "-q", cwd=work))
    metrics = train["metrics"]
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    delta = read_delta(work / "delta.safetensors")
    assert set(delta.indices) == set(mask.indices) and delta.full == {}

    evaluated = ok(fps("eval", "--json", "-q", cwd=work))
    assert evaluated["perplexity"] == pytest.approx(metrics["val_perplexity"], rel=1e-6)
    assert evaluated["tokens"] == metrics["val_tokens"]  # 12 completions, each its word and </s>
    assert evaluated["tokens"] == 12 * 2

    ok(fps("merge", "-o", "merged/", "--json", "-q", cwd=work))
    ok(fps("export", "--to", "peft", "-o", "adapter", "--json", "-q", cwd=work))
    config = json.loads((work / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "CAUSAL_LM" and config["base_model_name_or_path"] == str(work / "llm")
    merged = AutoModelForCausalLM.from_pretrained(work / "merged")
    tokenizer = AutoTokenizer.from_pretrained(work / "merged")
    adapted = AutoPeftModelForCausalLM.from_pretrained(work / "adapter")
    base = AutoModelForCausalLM.from_pretrained(work / "llm")
    ids = tokenizer(["what is two plus three"], return_tensors="pt")
    with torch.no_grad():
        out = merged(**ids).logits
        assert torch.equal(out, adapted(**ids).logits)
        assert not torch.equal(out, base(**ids).logits)
    generated = merged.generate(**ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape[1] > ids["input_ids"].shape[1]


def test_padding_never_counts_in_the_statistics(work):
    def sums(batch_size: int) -> dict:
        outputs = ["-o", f"m{batch_size}.safetensors", "--scores", f"s{batch_size}.safetensors"]
        ok(fps("select", "--model", "hf:llm", "--data", "sums.jsonl", "--batch-size", batch_size, *outputs, "--json",
               "-q", cwd=work))  # fmt: skip
        with safe_open(work / f"s{batch_size}.safetensors", "pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118

    one, padded = sums(1), sums(16)  # batch 1 has no padding; batches of 16 prompts of 4 lengths have much
    assert one.keys() == padded.keys()
    for name in one:
        torch.testing.assert_close(one[name], padded[name], rtol=1e-5, atol=1e-6, msg=name)


def test_grad_checkpointing_packing_and_train_on_inputs(work):
    ok(fps("select", "--model", "hf:llm", "--data", "sums.jsonl", "--budget", "0.05", "--json", "-q", cwd=work))
    args = ["train", "--epochs", "1", "--lr", "0.02", "--batch-size", "8", "--json", "-q"]
    plain = ok(fps(*args, cwd=work))
    checkpointed = ok(fps(*args, "--grad-checkpointing", "-o", "gc.safetensors", cwd=work))
    a, b = read_delta(work / "delta.safetensors"), read_delta(work / "gc.safetensors")
    for name in a.values:  # recomputing the activations changes no gradient
        torch.testing.assert_close(a.values[name], b.values[name], rtol=1e-5, atol=1e-7)
    assert checkpointed["metrics"]["train_loss"] == pytest.approx(plain["metrics"]["train_loss"], rel=1e-5)
    # Every token in the loss: more tokens counted, so a different (lower: prompts are repetitive) mean loss.
    everything = ok(fps(*args, "--train-on-inputs", "-o", "all.safetensors", cwd=work))
    assert everything["metrics"]["train_loss"] != plain["metrics"]["train_loss"]
    assert read_delta(work / "all.safetensors").provenance["data_options"]["train_on_inputs"] is True
    packed = ok(fps(*args, "--packing", "--max-length", "16", "-o", "packed.safetensors", cwd=work))
    assert math.isfinite(packed["metrics"]["train_loss"])


def test_bad_input_is_one_error_line_and_writes_nothing(work):
    (work / "bad.jsonl").write_text('{"text": "the cat"}\n\n{"text": "the dog"\n')
    line = one_error_line(fps("select", "--model", "hf:llm", "--data", "bad.jsonl", "-q", cwd=work))
    assert line.startswith("error: bad.jsonl:3: invalid JSON (Expecting ',' delimiter, column 1)")
    (work / "odd.jsonl").write_text('{"question": "q"}\n')
    assert "none of the known fields (fields: question)" in one_error_line(
        fps("select", "--model", "hf:llm", "--data", "odd.jsonl", "-q", cwd=work)
    )
    (work / "long.jsonl").write_text(json.dumps({"prompt": "the cat sat on the mat", "completion": "red"}) + "\n")
    assert "nothing left to learn after truncation to --max-length 4" in one_error_line(
        fps("select", "--model", "hf:llm", "--data", "long.jsonl", "--max-length", "4", "-q", cwd=work)
    )
    save_tiny_llama(work / "plain", make_tokenizer(chat_template=None))
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (work / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    assert "'messages' need a chat template, and the tokenizer has none" in one_error_line(
        fps("select", "--model", "hf:plain", "--data", "chat.jsonl", "-q", cwd=work)
    )
    assert not (work / "mask.safetensors").exists() and not (work / "scores.safetensors").exists()


def test_a_tokenizer_without_pad_pads_with_eos_and_says_so(work):
    save_tiny_llama(work / "nopad", make_tokenizer(pad=False))
    result = fps("select", "--model", "hf:nopad", "--data", "sums.jsonl", "--budget", "0.05", cwd=work)
    assert result.exit_code == 0, result.output
    assert "the tokenizer has no pad token: padding with its end-of-sequence token '</s>'" in result.stderr


def test_progress_counts_examples_not_images_or_rows(work):
    """A language model's progress counts examples (not packed rows, not tokens) and says so."""
    selected = fps("select", "--model", "hf:llm", "--data", "sums.jsonl", "--budget", "0.05", "--packing",
                   "--max-length", "16", cwd=work)  # fmt: skip
    assert selected.exit_code == 0, selected.output
    assert "scoring: 48/48 examples (100%)" in selected.stderr and "img/s" not in selected.stderr
    trained = fps("train", "--epochs", "1", "--lr", "0.02", "--batch-size", "8", cwd=work)
    assert trained.exit_code == 0, trained.output
    assert "examples/s" in trained.stderr and "img/s" not in trained.stderr
    # The bar's total is epochs x examples; the progress events must add up to it (they once counted tokens).
    from fps_cli.finetune import TrainConfig, run_train
    from fps_cli.hub import ModelSpec

    events = []
    mask = read_mask(work / "mask.safetensors")
    run_train(mask, TrainConfig(epochs=2, lr=0.02, batch_size=8), spec=ModelSpec("hf:" + str(work / "llm")),
              data_dir=work / "sums.jsonl", on_event=events.append,
              data_options=mask.provenance["data_options"])  # fmt: skip
    start = next(e for e in events if e["event"] == "start")
    assert sum(e["images"] for e in events if e["event"] == "progress") == 2 * start["train_samples"] == 96
