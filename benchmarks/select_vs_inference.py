"""FPS selection pass vs plain inference: throughput and peak memory, as ratios (DESIGN.md section 6).

    python benchmarks/select_vs_inference.py --model vit_base_patch16_224 --batch-size 32 --batches 6
    python benchmarks/select_vs_inference.py --device cuda --precision bf16 --batch-size 64 --batches 50 --json

Both variants run the same model, batch, precision and device on the same images (seeded random tensors, so no
data loading is timed). Each runs in its own subprocess, so that a CPU run's peak RSS belongs to one variant only;
on CUDA the peak is ``torch.cuda.max_memory_allocated``. One warm-up batch is not timed. Targets: throughput
ratio >= 0.90, memory ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def worker(args: argparse.Namespace) -> dict:
    import timm
    import torch

    from fps_cli.activations import autocast, collect_input_stats
    from fps_cli.candidates import parameter_roles

    torch.manual_seed(0)
    device = torch.device(args.device)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes).to(device).eval()
    size = model.pretrained_cfg["input_size"][-1] if args.img_size is None else args.img_size
    images = torch.randn(args.batch_size, 3, size, size)
    if device.type == "cuda":
        images = images.pin_memory()
    candidates = parameter_roles(model).candidates

    def run(batches: int) -> None:
        if args.variant == "inference":
            with torch.inference_mode(), autocast(device, args.precision):
                for _ in range(batches):
                    model(images.to(device, non_blocking=True))
        else:
            collect_input_stats(model, candidates, [images] * batches, device=device, precision=args.precision)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    run(1)  # warm-up: kernels, allocator, caches
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    start = time.perf_counter()
    run(args.batches)
    sync()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak, unit = torch.cuda.max_memory_allocated(device), "cuda_max_allocated_bytes"
        activations_peak = peak - base
    else:
        peak, unit = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss_bytes"
        activations_peak = None
    return {
        "variant": args.variant,
        "images_per_s": args.batch_size * args.batches / seconds,
        "seconds": seconds,
        "peak_bytes": peak,
        "peak_above_weights_bytes": activations_peak,
        "memory_unit": unit,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--num-classes", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=1, help="alternate the two variants this many times")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--variant", choices=["inference", "fps"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return

    runs: dict[str, list[dict]] = {"inference": [], "fps": []}
    passthrough = [a for a in sys.argv[1:] if a != "--json"]
    for _ in range(args.repeats):
        for variant in runs:
            out = subprocess.run(
                [sys.executable, __file__, *passthrough, "--variant", variant],
                check=True,
                capture_output=True,
                text=True,
            )
            runs[variant].append(json.loads(out.stdout.strip().splitlines()[-1]))

    def best(variant: str, key: str, fn=max) -> float:
        return fn(r[key] for r in runs[variant])

    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "device": args.device,
        "precision": args.precision,
        "repeats": args.repeats,
        "inference_images_per_s": best("inference", "images_per_s"),
        "fps_images_per_s": best("fps", "images_per_s"),
        "inference_peak_bytes": best("inference", "peak_bytes", min),
        "fps_peak_bytes": best("fps", "peak_bytes", min),
        "memory_unit": runs["fps"][0]["memory_unit"],
    }
    result["throughput_ratio"] = result["fps_images_per_s"] / result["inference_images_per_s"]
    result["memory_ratio"] = result["fps_peak_bytes"] / result["inference_peak_bytes"]
    if args.json:
        print(json.dumps(result))
        return
    mib = 2**20
    print(f"{args.model}  batch {args.batch_size} x {args.batches}  {args.device} {args.precision}")
    for label, key in (("inference", "inference"), ("fps pass", "fps")):
        rate, peak = result[f"{key}_images_per_s"], result[f"{key}_peak_bytes"] / mib
        print(f"  {label:10} {rate:8.1f} img/s  peak {peak:8.0f} MiB")
    print(
        f"  throughput ratio {result['throughput_ratio']:.3f} (target >= 0.90)   "
        f"memory ratio {result['memory_ratio']:.3f} (target <= 1.10)   [{result['memory_unit']}]"
    )


if __name__ == "__main__":
    main()
