"""Sparse fine-tuning vs full fine-tuning: peak memory, step time and optimizer-state size (DESIGN.md section 6).

Both variants train the same randomly initialised model (``pretrained=False``) for a few AdamW steps on the same
random batch, at the same precision. Each runs in its own subprocess, so that peak RSS (the CPU figure) of one
cannot mask the other's; on CUDA the figure is ``torch.cuda.max_memory_allocated``. The mask is a neuron-level
selection at the default budget (scored by ``|W|``: which entries are chosen does not change the cost, only how
many per row), written once by the parent and read by the sparse child.

Targets: sparse / full peak memory <= 0.85, step time <= 1.0; optimizer state = 2 numbers per trainable element.

    python benchmarks/train_memory.py                         # vit_base_patch16_224, batch 8, 3 timed steps
    python benchmarks/train_memory.py --device cuda --batch-size 64 --precision bf16
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


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--num-classes", type=int, default=100, help="head size (a VTAB-1k-sized task by default)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps (after --warmup-steps)")
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--budget", type=float, default=0.0077)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--variant", choices=("sparse", "full"), help=argparse.SUPPRESS)
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
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).to(device).train()
    config = TrainConfig(precision=args.precision)
    total_params = sum(p.numel() for p in model.parameters())  # before attaching adds the deltas
    if args.variant == "sparse":
        mask = read_mask(args.mask)
        trainable = attach(model, mask.indices, mask.fully_trainable)
        optimizer = make_optimizer(trainable, config)
        context = recompute_sparse_weights
        n_trainable = trainable.numel
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        context = torch.enable_grad
        n_trainable = sum(p.numel() for p in model.parameters())
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, *size, generator=generator).to(device)
    labels = torch.randint(0, model.num_classes, (args.batch_size,), generator=generator).to(device)
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
    """A neuron-level mask at ``args.budget``, scored by ``|W|`` (no data needed), saved to ``path``."""
    import timm
    import torch

    from fps_cli.candidates import parameter_roles
    from fps_cli.formats import Mask, save_mask
    from fps_cli.selection import select
    from fps_cli.selector import selection_count

    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes)
    roles = parameter_roles(model)
    with torch.no_grad():
        scores = {n: m.weight.abs().reshape(m.weight.shape[0], -1) for n, m in roles.candidates.items()}
        indices = select(scores, selection_count(roles, args.budget), "neuron")
    mask = Mask(indices, list(roles.fully_trainable), dict(roles.shapes), {"model": args.model})
    save_mask(path, mask)
    return {"selected": mask.selected, "trainable": mask.trainable, "total_params": mask.total_params}


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.variant:
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        mask_path = Path(tmp) / "mask.safetensors"
        mask_info = write_mask(args, mask_path)
        base = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        results = {}
        for variant in ("sparse", "full"):
            out = subprocess.run(
                [sys.executable, __file__, *base, "--variant", variant, "--mask", str(mask_path)],
                check=True,
                capture_output=True,
                text=True,
            )
            results[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    sparse, full = results["sparse"], results["full"]
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "device": sparse["device"],
        "timed_steps": args.steps,
        "mask": mask_info,
        "sparse": sparse,
        "full": full,
        "memory_ratio": sparse["peak_bytes"] / full["peak_bytes"],
        "step_time_ratio": sparse["step_seconds"] / full["step_seconds"],
        "optimizer_state_ratio": sparse["optimizer_state_elements"] / full["optimizer_state_elements"],
        "state_elements_per_trainable": sparse["optimizer_state_elements"] / sparse["trainable"],
    }
    if sparse["rss_before_training"] is not None:
        grow = [r["peak_bytes"] - r["rss_before_training"] for r in (sparse, full)]
        report["training_memory_ratio"] = grow[0] / grow[1] if grow[1] > 0 else None
    if args.json:
        print(json.dumps(report))
        return
    gib = 2**30
    print(f"{args.model}, batch {args.batch_size}, {args.precision}, {sparse['device']}, {args.steps} timed steps")
    print(f"mask: {mask_info['trainable']:,} of {mask_info['total_params']:,} parameters trainable")
    for name, r in (("sparse", sparse), ("full", full)):
        print(
            f"  {name:6s} peak {r['peak_bytes'] / gib:6.2f} GiB  step {r['step_seconds']:7.3f} s (min)  "
            f"optimizer state {r['optimizer_state_elements']:,} elements (+{r['optimizer_state_scalars']} scalars)"
        )
    print(f"memory ratio     {report['memory_ratio']:.3f}  (target <= 0.85)")
    if "training_memory_ratio" in report:
        print(f"  above the RSS before the first step: {report['training_memory_ratio']:.3f}")
    print(f"step time ratio  {report['step_time_ratio']:.3f}  (target <= 1.0)")
    print(
        f"optimizer state  {report['optimizer_state_ratio']:.4f} of full; "
        f"{report['state_elements_per_trainable']:g} per trainable element"
    )


if __name__ == "__main__":
    main()
