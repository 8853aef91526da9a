"""Sparse vs full fine-tuning vs PEFT: peak memory, step time and optimizer-state size (DESIGN.md section 6).

Every variant trains the same randomly initialised model (``pretrained=False``) for a few AdamW steps on the same
random batch, at the same precision:

- ``full``: every parameter, AdamW.
- ``sparse``: fps's sparse fine-tuning (:func:`fps_cli.sparse.attach`, the sparse path: delta gradients sampled at
  the selected entries) with a neuron-level mask at ``--budget`` (scored by ``|W|``: which entries are chosen does
  not change the cost, only how many per row), head and biases trained in full, as ``fps train`` does.
- ``sparse_dense``: the same mask on the old dense-gradient path (``attach(..., path="dense")``).
- ``sparse_torch_kernel``: ``sparse`` with torch's CPU ``sparse_sampled_addmm`` for the delta's gradient instead of
  fps's kernel (``FPS_SAMPLED_PRODUCT=torch``, fps_cli/sampled_product.py): what the kernel saves, and costs.
- ``lora``: PEFT LoRA, r = 8 (alpha 8, no dropout) on every block's qkv / proj / fc1 / fc2, head trained in full.
- ``shira``: PEFT SHiRA (random sparse mask) on the same layers with ``r`` chosen so that its trainable count
  (head included) is closest to fps's, head trained in full.

Each variant runs in its own subprocess (a fresh process per variant and repeat, the variants alternated), so that
peak RSS (the CPU figure) of one cannot mask another's; on CUDA the figure is ``torch.cuda.max_memory_allocated``.
Each figure is the minimum over repeats (and over the timed steps within one), the one least disturbed by other
processes on a shared machine.

Targets (ratios to full fine-tuning): sparse step time <= 0.75 and below LoRA's; peak memory <= 0.80; optimizer
state = 2 numbers per trainable element.

    python benchmarks/train_memory.py --batch-size 16 --repeats 2     # vit_base_patch16_224, CPU fp32
    python benchmarks/train_memory.py --device cuda --batch-size 64 --precision bf16
    python benchmarks/train_memory.py --batch-size 16 --variants full sparse --repeats 2 --busy 4   # idle and busy

``--busy N`` measures every variant a second time with N competing CPU-bound processes running
(benchmarks/busy.py), the idle and busy runs alternated within each repeat, and reports both side by side with the
load average seen at each run (on a shared machine "idle" means: no competitors of the benchmark's own).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from busy import busy, child_argv, load_average  # noqa: E402

VARIANTS = ("full", "sparse", "sparse_dense", "sparse_torch_kernel", "lora", "shira")
# Every transformer block's linear layers (timm ViT names; patch_embed.proj is a convolution).
PEFT_TARGETS = r".*blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(fc1|fc2))"


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--num-classes", type=int, default=100, help="head size (a VTAB-1k-sized task by default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--img-size", type=int, default=None, help="input resolution (default: the model's)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup-steps)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", type=float, default=0.0077)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=1, help="fresh processes per variant (the minimum is reported)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--busy", type=int, default=0, help="also measure with N competing CPU-bound processes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    p.add_argument("--shira-r", type=int, help=argparse.SUPPRESS)
    p.add_argument("--mask", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _peak_bytes(device) -> int:
    import resource

    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def base_model(model):
    """The timm model inside a PEFT wrapper (or the model itself)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def child(args: argparse.Namespace) -> dict:
    """Train one variant for a few steps and report its figures."""
    import timm
    import torch
    import torch.nn.functional as F

    from fps_cli.activations import autocast
    from fps_cli.finetune import TrainConfig, make_optimizer, optimizer_state_numel
    from fps_cli.formats import read_mask
    from fps_cli.selector import resolve_device
    from fps_cli.sparse import attach, recompute_sparse_weights

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size} if getattr(args, "img_size", None) else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kwargs).to(device).train()
    config = TrainConfig(precision=args.precision)
    total_params = sum(p.numel() for p in model.parameters())  # before attaching adds the deltas
    context = torch.enable_grad
    if args.variant == "sparse_torch_kernel":
        os.environ["FPS_SAMPLED_PRODUCT"] = "torch"
    if args.variant in ("sparse", "sparse_dense", "sparse_torch_kernel"):
        mask = read_mask(args.mask)
        path = "dense" if args.variant == "sparse_dense" else "sparse"
        trainable = attach(model, mask.indices, mask.fully_trainable, path=path)
        optimizer = make_optimizer(trainable, config)
        context = recompute_sparse_weights
        n_trainable = trainable.numel
    elif args.variant in ("lora", "shira"):
        import peft

        if args.variant == "lora":
            peft_config = peft.LoraConfig(
                r=8, lora_alpha=8, lora_dropout=0.0, target_modules=PEFT_TARGETS, modules_to_save=["head"]
            )
        else:
            peft_config = peft.ShiraConfig(r=args.shira_r, target_modules=PEFT_TARGETS, modules_to_save=["head"])
        model = peft.get_peft_model(model, peft_config)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        n_trainable = sum(p.numel() for p in params)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        n_trainable = sum(p.numel() for p in model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    size = base_model(model).pretrained_cfg.get("input_size", (3, 224, 224))
    if getattr(args, "img_size", None):
        size = (size[0], args.img_size, args.img_size)
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, *size, generator=generator).to(device)
    labels = torch.randint(0, args.num_classes, (args.batch_size,), generator=generator).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    before = _current_rss()

    times = []
    for step in range(args.warmup_steps + args.steps):
        start = time.perf_counter()
        with context(), autocast(device, args.precision):
            logits = model(images)
        loss = F.cross_entropy(logits.float(), labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step >= args.warmup_steps:
            times.append(time.perf_counter() - start)
    elements, scalars = optimizer_state_numel(optimizer)
    return {
        "variant": args.variant,
        "device": str(device),
        "peak_bytes": _peak_bytes(device),
        "rss_before_training": before if device.type == "cpu" else None,
        # The minimum is the figure least disturbed by other processes on a shared machine (as timeit reports).
        "step_seconds": min(times),
        "step_seconds_median": statistics.median(times),
        "trainable": n_trainable,
        "total_params": total_params,
        "optimizer_state_elements": elements,
        "optimizer_state_scalars": scalars,
        "loss": float(loss),
    }


def write_mask(args: argparse.Namespace, path: Path) -> dict:
    """A neuron-level mask at ``args.budget``, scored by ``|W|`` (no data needed), saved to ``path``.

    Also returns SHiRA's ``r`` whose trainable count (``r * (out + in)`` per targeted layer, plus the head) is
    closest to fps's (selected entries, head and biases).
    """
    import re

    import timm
    import torch

    from fps_cli.candidates import parameter_roles
    from fps_cli.formats import Mask, save_mask
    from fps_cli.selection import select
    from fps_cli.selector import selection_count

    torch.manual_seed(0)
    kwargs = {"img_size": args.img_size} if getattr(args, "img_size", None) else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kwargs)
    roles = parameter_roles(model)
    with torch.no_grad():
        scores = {n: m.weight.abs().reshape(m.weight.shape[0], -1) for n, m in roles.candidates.items()}
        indices = select(scores, selection_count(roles, args.budget), "neuron")
    mask = Mask(indices, list(roles.fully_trainable), dict(roles.shapes), {"model": args.model})
    save_mask(path, mask)
    per_r = sum(
        sum(m.weight.shape) for n, m in model.named_modules() if re.fullmatch(PEFT_TARGETS, n) and hasattr(m, "weight")
    )
    head = sum(p.numel() for p in model.get_classifier().parameters())
    shira_r = max(1, round((mask.trainable - head) / per_r)) if per_r else 1
    return {
        "selected": mask.selected,
        "trainable": mask.trainable,
        "total_params": mask.total_params,
        "shira_r": shira_r,
        "shira_trainable": shira_r * per_r + head,
    }


def summarize(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """Per variant: the minimum of each figure over repeats, and the ratios to full fine-tuning."""
    results = {}
    for variant, rs in runs.items():
        best = dict(rs[0])
        best.pop("load_average", None)
        best["load_averages"] = [r["load_average"] for r in rs]
        for key in ("peak_bytes", "step_seconds", "step_seconds_median"):
            best[key] = min(r[key] for r in rs)
        if best["rss_before_training"] is not None:
            best["training_bytes"] = min(r["peak_bytes"] - r["rss_before_training"] for r in rs)
        results[variant] = best
    full = results.get("full")
    for variant, r in results.items():
        r["state_elements_per_trainable"] = r["optimizer_state_elements"] / r["trainable"]
        if full is not None:
            r["memory_ratio"] = r["peak_bytes"] / full["peak_bytes"]
            r["step_time_ratio"] = r["step_seconds"] / full["step_seconds"]
            # Each repeat's own ratio too (the variants of one repeat ran back to back).
            r["step_time_ratios_per_repeat"] = [
                a["step_seconds"] / b["step_seconds"] for a, b in zip(runs[variant], runs["full"], strict=True)
            ]
            if "training_bytes" in r:
                r["training_memory_ratio"] = r["training_bytes"] / full["training_bytes"]
    return results


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return
    base = child_argv(list(argv if argv is not None else sys.argv[1:]))
    conditions = ["idle", "busy"] if args.busy else ["idle"]
    runs: dict[str, dict[str, list[dict]]] = {c: {v: [] for v in args.variants} for c in conditions}
    with tempfile.TemporaryDirectory() as tmp:
        mask_path = Path(tmp) / "mask.safetensors"
        mask_info = write_mask(args, mask_path)
        for _ in range(args.repeats):
            for condition in conditions:  # alternated: a slow spell of the machine hits both conditions
                with busy(args.busy if condition == "busy" else 0):
                    for variant in args.variants:  # alternated: a slow spell of the machine hits every variant
                        extra = ["--shira-r", str(mask_info["shira_r"])] if variant == "shira" else []
                        load = load_average()
                        out = subprocess.run(
                            [sys.executable, __file__, *base, "--variant", variant, "--mask", str(mask_path), *extra],
                            check=True,
                            capture_output=True,
                            text=True,
                        )
                        run = json.loads(out.stdout.strip().splitlines()[-1])
                        run["load_average"] = [load, load_average()]
                        runs[condition][variant].append(run)
                        print(f"{condition} {variant}: {json.dumps(run)}", file=sys.stderr, flush=True)  # progress
    results = summarize(runs["idle"])
    busy_results = summarize(runs["busy"]) if args.busy else None
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": next(iter(results.values()))["device"],
        "timed_steps": args.steps,
        "repeats": args.repeats,
        "mask": mask_info,
        "variants": results,
    }
    if busy_results is not None:
        report["busy"] = {"processes": args.busy, "variants": busy_results}
    if args.json:
        print(json.dumps(report))
        return
    gib = 2**30
    print(
        f"{args.model}, batch {args.batch_size}, {args.precision}, {report['device']}, "
        f"{args.steps} timed steps, min of {args.repeats} fresh process(es) per variant"
    )
    print(f"mask: {mask_info['trainable']:,} of {mask_info['total_params']:,} parameters trainable")
    tables = [("idle", results)] + ([(f"busy ({args.busy} competing processes)", busy_results)] if args.busy else [])
    for condition, table in tables:
        loads = [x for r in table.values() for pair in r["load_averages"] for x in pair]
        print(f" {condition}: load average {min(loads):.1f}-{max(loads):.1f}")
        base_full = table.get("full")
        for name, r in table.items():
            ratios = ""
            if base_full is not None:
                ratios = f"  time {r['step_time_ratio']:.3f}  peak {r['memory_ratio']:.3f}"
                if "training_memory_ratio" in r:
                    ratios += f" (growth {r['training_memory_ratio']:.3f})"
                if len(r["step_time_ratios_per_repeat"]) > 1:
                    ratios += " per repeat " + ", ".join(f"{x:.3f}" for x in r["step_time_ratios_per_repeat"])
            print(
                f"  {name:12s} peak {r['peak_bytes'] / gib:6.2f} GiB  step {r['step_seconds']:7.3f} s  "
                f"trainable {r['trainable']:,}  state/trainable {r['state_elements_per_trainable']:g}{ratios}"
            )
    print("targets: sparse time <= 0.75 and below lora's; sparse peak <= 0.80; 2 state elements per trainable")


if __name__ == "__main__":
    main()
