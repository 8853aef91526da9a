"""FPS selection pass vs plain inference: throughput and peak memory, as ratios (DESIGN.md section 6).

    python benchmarks/select_vs_inference.py --model vit_base_patch16_224 --batch-size 32 --batches 6
    python benchmarks/select_vs_inference.py --device cuda --precision bf16 --batch-size 64 --batches 50 --json
    python benchmarks/select_vs_inference.py --batch-size 16 --batches 3 --repeats 2 --busy 4   # idle and busy

Both variants run the same model, batch, precision and device on the same images (seeded random tensors, so no
data loading is timed). Each runs in its own subprocess, so that a CPU run's peak RSS belongs to one variant only;
on CUDA the peak is ``torch.cuda.max_memory_allocated``. One warm-up batch is not timed. Targets: throughput
ratio >= 0.90, memory ratio <= 1.10.

``--busy N`` measures everything a second time with N competing CPU-bound processes running (benchmarks/busy.py),
the idle and busy runs alternated within each repeat, and reports both side by side with the load average seen
at each run (on a shared machine "idle" means: no competitors of the benchmark's own).
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from busy import busy, load_average


def worker(args: argparse.Namespace) -> dict:
    import timm
    import torch

    from fps_cli.activations import autocast, collect_input_stats
    from fps_cli.candidates import parameter_roles

    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = {"img_size": args.img_size} if args.img_size else {}
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kwargs).to(device).eval()
    size = model.pretrained_cfg["input_size"][-1] if args.img_size is None else args.img_size
    images = torch.randn(args.batch_size, 3, size, size)
    if device.type == "cuda":
        images = images.pin_memory()
    candidates = parameter_roles(model).candidates

    if args.variant == "fps_all_threads":  # the reductions' parallel regions as before issue 20, for comparison
        import contextlib

        import fps_cli.activations

        fps_cli.activations.one_thread = contextlib.nullcontext

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
        "threads": torch.get_num_threads(),
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
    parser.add_argument("--busy", type=int, default=0, help="also measure with N competing CPU-bound processes")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--with-all-threads",
        action="store_true",
        help="also run the pass with its reductions on all threads (as before issue 20), alternated with the others",
    )
    parser.add_argument("--variant", choices=["inference", "fps", "fps_all_threads"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(worker(args)))
        return

    conditions = ["idle", "busy"] if args.busy else ["idle"]
    variants = ["inference", "fps", *(["fps_all_threads"] if args.with_all_threads else [])]
    runs: dict[str, dict[str, list[dict]]] = {c: {v: [] for v in variants} for c in conditions}
    skip = {"--json", "--with-all-threads"}
    passthrough, argv = [], sys.argv[1:]
    for i, a in enumerate(argv):  # the workers get neither --json nor --busy
        if a in skip or a.startswith("--busy") or (i > 0 and argv[i - 1] == "--busy"):
            continue
        passthrough.append(a)
    for _ in range(args.repeats):
        for condition in conditions:  # alternated: a slow spell of the machine hits both conditions
            with busy(args.busy if condition == "busy" else 0):
                for variant in variants:
                    load = load_average()
                    out = subprocess.run(
                        [sys.executable, __file__, *passthrough, "--variant", variant],
                        check=True,
                        capture_output=True,
                        text=True,
                    )
                    run = json.loads(out.stdout.strip().splitlines()[-1])
                    run["load_average"] = [load, load_average()]
                    runs[condition][variant].append(run)
                    print(f"{condition} {variant}: {json.dumps(run)}", file=sys.stderr, flush=True)  # progress

    def summary(by_variant: dict[str, list[dict]]) -> dict:
        def best(variant: str, key: str, fn=max) -> float:
            return fn(r[key] for r in by_variant[variant])

        row = {
            "inference_images_per_s": best("inference", "images_per_s"),
            "fps_images_per_s": best("fps", "images_per_s"),
            "inference_peak_bytes": best("inference", "peak_bytes", min),
            "fps_peak_bytes": best("fps", "peak_bytes", min),
            "memory_unit": by_variant["fps"][0]["memory_unit"],
            # Every run's own ratio too: the best-of figures may come from different spells of the machine.
            "throughput_ratios_per_repeat": [
                f["images_per_s"] / i["images_per_s"]
                for i, f in zip(by_variant["inference"], by_variant["fps"], strict=True)
            ],
            "load_average": [r["load_average"] for v in by_variant for r in by_variant[v]],
        }
        row["throughput_ratio"] = row["fps_images_per_s"] / row["inference_images_per_s"]
        if "fps_all_threads" in by_variant:
            row["fps_all_threads_images_per_s"] = best("fps_all_threads", "images_per_s")
            row["all_threads_throughput_ratio"] = row["fps_all_threads_images_per_s"] / row["inference_images_per_s"]
        row["memory_ratio"] = row["fps_peak_bytes"] / row["inference_peak_bytes"]
        return row

    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "device": args.device,
        "precision": args.precision,
        "repeats": args.repeats,
        "threads": runs["idle"]["fps"][0].get("threads"),
        **summary(runs["idle"]),
    }
    if args.busy:
        result["busy"] = {"processes": args.busy, **summary(runs["busy"])}
    if args.json:
        print(json.dumps(result))
        return
    mib = 2**20
    print(
        f"{args.model}  batch {args.batch_size} x {args.batches}  {args.device} {args.precision}  "
        f"{result['threads']} threads, best of {args.repeats}"
    )
    rows = [("idle", result)] + ([(f"busy ({args.busy} competing processes)", result["busy"])] if args.busy else [])
    for condition, row in rows:
        loads = [x for pair in row["load_average"] for x in pair]
        print(f" {condition}: load average {min(loads):.1f}-{max(loads):.1f}")
        for label, key in (("inference", "inference"), ("fps pass", "fps")):
            rate, peak = row[f"{key}_images_per_s"], row[f"{key}_peak_bytes"] / mib
            print(f"  {label:10} {rate:8.2f} img/s  peak {peak:8.0f} MiB")
        if "all_threads_throughput_ratio" in row:
            print(
                f"  fps pass, reductions on all threads (before issue 20) {row['fps_all_threads_images_per_s']:8.2f} "
                f"img/s  ratio {row['all_threads_throughput_ratio']:.3f}"
            )
        per_repeat = ", ".join(f"{r:.3f}" for r in row["throughput_ratios_per_repeat"])
        print(
            f"  throughput ratio {row['throughput_ratio']:.3f} (target >= 0.90; per repeat {per_repeat})   "
            f"memory ratio {row['memory_ratio']:.3f} (target <= 1.10)   [{row['memory_unit']}]"
        )


if __name__ == "__main__":
    main()
