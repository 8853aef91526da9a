"""A causal language model's training step on the CPU: fps's sparse path vs full fine-tuning vs PEFT LoRA r=8.

A ~100 M-parameter Llama-style model (randomly initialised: hidden 768, 12 layers, 12 heads / 4 key-value heads,
MLP 2048, vocabulary 32000, tied embeddings), fp32, a batch of random token ids (``--batch-size`` 4 of
``--seq-len`` 256), AdamW:

- ``full``: every parameter, transformers' own loss (``labels``: the whole ``[batch, seq, vocab]`` logits).
- ``lora``: PEFT LoRA r=8 (alpha 16, no dropout) on q_proj / v_proj, PEFT's default targets for Llama, transformers'
  own loss: what a PEFT user runs.
- ``sparse``: fps's sparse path (:func:`fps_cli.sparse.attach`) on every Linear of the decoder (q, k, v, o, gate,
  up, down; ``lm_head`` is tied to the embedding and stays frozen), neuron-level, as many entries as LoRA trains
  (scored by ``|W|``: which entries are chosen does not change the cost, only how many per row), inside
  :func:`fps_cli.sparse.recompute_sparse_weights`, with the causal-LM task's forward and loss (the logits made a
  chunk of tokens at a time, :mod:`fps_cli.tasks.next_token`): as ``fps train`` runs it.
- ``sparse_hf_loss``: the same sparse path with transformers' own loss: the sparse path's share of the difference.
- ``sparse_qv``: ``sparse`` with its entries in q_proj / v_proj only (LoRA's layers, LoRA's count): the cost of
  the mechanism per layer, apart from how many layers it touches.
- ``lora_all``: LoRA r=8 on every Linear of the decoder (PEFT's ``"all-linear"``, what QLoRA recipes use; more
  trainable parameters than the others): LoRA over the layers fps's mask covers.
- ``sparse_no_recipes``: ``sparse`` with every masked Linear saving its input instead of rebuilding a norm's or the
  gated product's output in its backward: the time the rebuilds cost, and the memory they save.
- ``sparse_torch_kernel``: ``sparse`` with torch's CPU ``sparse_sampled_addmm`` for the delta's gradient instead of
  fps's kernel (``FPS_SAMPLED_PRODUCT=torch``, fps_cli/sampled_product.py): what the kernel saves, and costs.

Each variant runs in a fresh process, the variants alternated over ``--repeats``, so that one's peak RSS cannot
mask another's; each figure is the minimum over repeats (and over the timed steps within one), the one least
disturbed by other processes. The load average is reported: on a shared machine only ratios within one run mean
anything.

Targets (ratios to full fine-tuning): sparse step time <= 0.75 and <= LoRA's; sparse peak RSS <= 0.80 and <= LoRA's.

    python benchmarks/train_step_llm.py --repeats 2
    python benchmarks/train_step_llm.py --repeats 2 --busy 2    # the same on a busy machine (benchmarks/busy.py)
    python benchmarks/train_step_llm.py --layers 2 --seq-len 64 --steps 1 --json     # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from busy import busy, child_argv  # noqa: E402

VARIANTS = (
    "full",
    "sparse",
    "lora",
    "sparse_hf_loss",
    "sparse_torch_kernel",
    "sparse_qv",
    "lora_all",
    "sparse_no_recipes",
)
LORA_TARGETS = ("q_proj", "v_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--intermediate", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup-steps)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per variant (the minimum is reported)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--busy", type=int, default=0, help="run every variant with N competing CPU-bound processes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--mask", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def build(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=12,
        num_key_value_heads=4,
        max_position_embeddings=max(2048, args.seq_len),
        tie_word_embeddings=True,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def decoder_linears(model) -> dict:
    """Every ``nn.Linear`` of the decoder, by parameter name of its weight (``lm_head`` left out)."""
    import torch

    prefix = model.base_model_prefix
    return {f"{prefix}.{n}.weight": m for n, m in model.get_decoder().named_modules() if type(m) is torch.nn.Linear}


def lora_count(model, r: int) -> int:
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in decoder_linears(model).items()
        if n.rsplit(".", 2)[-2] in LORA_TARGETS
    )


def write_mask(args: argparse.Namespace, path: Path) -> dict:
    """Neuron-level masks of LoRA's trainable count, scored by ``|W|``: over the decoder's Linear layers (``path``)
    and over q_proj / v_proj only (``path`` with ``_qv`` added, for ``sparse_qv``)."""
    import torch

    from fps_cli.formats import Mask, save_mask
    from fps_cli.selection import select

    model = build(args)
    count = lora_count(model, args.lora_r)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    with torch.no_grad():
        scores = {n: m.weight.abs() for n, m in decoder_linears(model).items()}
        save_mask(path, Mask(select(scores, count, "neuron"), [], shapes, {"model": "llama-100m"}))
        scores = {n: s for n, s in scores.items() if n.rsplit(".", 2)[-2] in LORA_TARGETS}
        save_mask(_qv(path), Mask(select(scores, count, "neuron"), [], shapes, {"model": "llama-100m"}))
    return {"trainable": count, "total_params": sum(p.numel() for p in model.parameters())}


def _qv(path: Path | str) -> Path:
    path = Path(path)
    return path.with_name(f"{path.stem}_qv{path.suffix}")


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args: argparse.Namespace) -> dict:
    """Train one variant for a few steps and report its figures."""
    import torch

    from fps_cli.finetune import TrainConfig, make_optimizer
    from fps_cli.formats import read_mask
    from fps_cli.sparse import attach, recompute_sparse_weights
    from fps_cli.tasks import causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args).train()
    config = TrainConfig()
    context = torch.enable_grad
    if args.variant == "sparse_torch_kernel":
        os.environ["FPS_SAMPLED_PRODUCT"] = "torch"
    if args.variant == "sparse_no_recipes":
        from fps_cli import sparse

        sparse._input_recipe = lambda x: None  # every masked Linear saves its input (this child process only)
    if args.variant in ("sparse", "sparse_hf_loss", "sparse_torch_kernel", "sparse_qv", "sparse_no_recipes"):
        mask = read_mask(_qv(args.mask) if args.variant == "sparse_qv" else args.mask)
        trainable = attach(model, mask.indices, mask.fully_trainable)
        optimizer = make_optimizer(trainable, config)
        context = recompute_sparse_weights
        n_trainable = trainable.numel
    elif args.variant in ("lora", "lora_all"):
        import peft

        targets = LORA_TARGETS if args.variant == "lora" else ALL_LINEAR
        lora = peft.LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0, target_modules=targets)
        model = peft.get_peft_model(model, lora)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        n_trainable = sum(p.numel() for p in params)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        n_trainable = sum(p.numel() for p in model.parameters())
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=generator)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    before = _current_rss()
    times = []
    for step in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        with context():
            if args.variant not in ("full", "lora", "lora_all", "sparse_hf_loss"):  # fps train's forward and loss
                loss = causal_lm.loss(causal_lm.forward(model, batch), batch)
            else:
                loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - start)
    return {
        "variant": args.variant,
        "peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_before_training": before,
        "step_seconds": min(times),
        "step_seconds_median": statistics.median(times),
        "trainable": n_trainable,
        "loss": float(loss),
    }


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return
    base = child_argv(list(argv if argv is not None else sys.argv[1:]))
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    load_start = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, busy(args.busy):
        mask_path = Path(tmp) / "mask.safetensors"
        mask_info = write_mask(args, mask_path)
        for _ in range(args.repeats):
            for variant in args.variants:  # alternated: a slow spell of the machine hits every variant
                out = subprocess.run(
                    [sys.executable, __file__, *base, "--variant", variant, "--mask", str(mask_path)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {}
    for variant, rs in runs.items():
        best = dict(rs[0])
        for key in ("peak_bytes", "step_seconds", "step_seconds_median"):
            best[key] = min(r[key] for r in rs)
        best["training_bytes"] = min(r["peak_bytes"] - r["rss_before_training"] for r in rs)
        results[variant] = best
    ratios, per_repeat = {}, {}
    for ours in VARIANTS[1:]:
        if ours.startswith("lora"):
            continue
        for other in ("full", "lora", "lora_all"):
            if {ours, other} <= results.keys():
                ratios[f"{ours}_over_{other}_time"] = results[ours]["step_seconds"] / results[other]["step_seconds"]
                ratios[f"{ours}_over_{other}_peak"] = results[ours]["peak_bytes"] / results[other]["peak_bytes"]
                # Each repeat's own ratio too: the variants of one repeat ran back to back, so its spread is the noise.
                per_repeat[f"{ours}_over_{other}_time"] = [
                    a["step_seconds"] / b["step_seconds"] for a, b in zip(runs[ours], runs[other], strict=True)
                ]
    if {"lora", "full"} <= results.keys():
        ratios["lora_over_full_time"] = results["lora"]["step_seconds"] / results["full"]["step_seconds"]
        ratios["lora_over_full_peak"] = results["lora"]["peak_bytes"] / results["full"]["peak_bytes"]
    report = {
        "model": {k: getattr(args, k) for k in ("hidden", "layers", "intermediate", "vocab")},
        "params": mask_info["total_params"],
        "trainable": mask_info["trainable"],
        "seq_len": args.seq_len,
        "batch_size": args.batch_size,
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "busy_processes": args.busy,
        "load_average_start": load_start,
        "load_average_end": os.getloadavg(),
        "seconds": time.perf_counter() - started,
        "variants": results,
        "ratios": ratios,
        "time_ratios_per_repeat": per_repeat,
    }
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"Llama-style {report['params'] / 1e6:.0f} M parameters, fp32, CPU, batch {args.batch_size} x "
        f"{args.seq_len} tokens, {args.steps} timed steps, min of {args.repeats} fresh process(es) per variant; "
        f"{f'{args.busy} competing processes, ' if args.busy else ''}"
        f"load average {load_start[0]:.1f} -> {report['load_average_end'][0]:.1f}"
    )
    for name, r in results.items():
        print(
            f"  {name:14s} step {r['step_seconds']:7.3f} s  peak RSS {r['peak_bytes'] / 2**30:6.2f} GiB  "
            f"trainable {r['trainable']:,}"
        )
    for name, ratio in ratios.items():
        repeats = per_repeat.get(name, [])
        each = f"  per repeat {', '.join(f'{x:.3f}' for x in repeats)}" if len(repeats) > 1 else ""
        print(f"  {name:31s} {ratio:6.3f}{each}")
    print("targets: sparse time <= 0.75 x full and <= lora's; sparse peak RSS <= 0.80 x full and <= lora's")


if __name__ == "__main__":
    main()
