"""FPS vs GPS selection on the same model and images: wall time, throughput, peak memory, mask overlap.

Each method runs in its own subprocess, so that the peaks do not mix: on a GPU the peak is
``torch.cuda.max_memory_allocated``; on a CPU it is the process's peak resident set size (``ru_maxrss``), reported
both in total and above the resident size just before the data pass (the pass's own memory: activations, and for
GPS the autograd graph and gradients). The ratios GPS / FPS are the figures of DESIGN.md section 6 (memory >= 9 on
a GPU at ViT-B/16 batch 64, time >= 3).

Example (CPU, about 5 minutes on two cores)::

    python benchmarks/select_fps_vs_gps.py --model vit_base_patch16_224 --batch-size 32 --images 64 --device cpu

Without ``--data``, ``--images`` random images are written to a temporary folder in ``--classes`` class folders
(GPS needs labels). The model is randomly initialised unless ``--pretrained``; selection cost does not depend on
the weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import procfs  # benchmarks/procfs.py: this script runs from its own folder

REPO = Path(__file__).resolve().parent.parent
METHODS = ("fps", "gps")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--pretrained", action="store_true", help="load pretrained weights (default: random init)")
    p.add_argument("--data", type=Path, help="image folder with class sub-folders (default: random images)")
    p.add_argument("--images", type=int, default=64, help="random images to generate without --data")
    p.add_argument("--classes", type=int, default=4, help="class folders of the generated images")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--budget", type=float, default=0.0077)
    p.add_argument("--no-augment", action="store_true", help="GPS: deterministic views")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--worker-mask", type=Path, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run_worker(args: argparse.Namespace) -> dict:
    """One method's selection in this process; returns its figures."""
    import resource

    import torch

    sys.path.insert(0, str(REPO))
    from fps_cli.formats import save_mask
    from fps_cli.models import ModelSpec
    from fps_cli.selector import SelectOptions, resolve_device, run_select

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    start_memory: dict[str, float] = {}

    def on_start(n: int) -> None:
        # The model is built and on the device: what the pass adds is measured from here.
        if cuda:
            torch.cuda.synchronize(device)
            start_memory["allocated_mib"] = torch.cuda.memory_allocated(device) / 2**20
            start_memory["peak_before_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
            torch.cuda.reset_peak_memory_stats(device)
        else:
            start_memory["allocated_mib"] = procfs.status_mib("VmRSS") or math.nan
            start_memory["peak_before_mib"] = procfs.status_mib("VmHWM") or math.nan

    spec = ModelSpec(args.model, pretrained=args.pretrained, img_size=args.img_size)
    augment = not (args.no_augment and args.worker == "gps")  # --no-augment is a GPS option: fps has no views
    options = SelectOptions(method=args.worker, budget=args.budget, seed=args.seed, augment=augment)
    wall = time.perf_counter()
    result = run_select(
        spec,
        args.data,
        options,
        device=device,
        precision=args.precision,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        on_start=on_start,
    )
    wall = time.perf_counter() - wall
    if cuda:
        pass_peak = torch.cuda.max_memory_allocated(device) / 2**20
        peak = max(pass_peak, start_memory["peak_before_mib"])
        memory_kind = "cuda_max_memory_allocated"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        pass_peak = peak
        memory_kind = "peak_rss"
    save_mask(args.worker_mask, result.mask)
    images = result.mask.provenance["num_samples"]
    return {
        "method": args.worker,
        "device": str(device),
        "images": images,
        "forward_images": images * (2 if args.worker == "gps" else 1),
        "pass_seconds": result.pass_seconds,
        "wall_seconds": wall,
        "images_per_second": images / result.pass_seconds,
        "memory_kind": memory_kind,
        "peak_mib": peak,
        "pass_extra_mib": max(0.0, pass_peak - start_memory["allocated_mib"]),
        "selected": result.mask.selected,
        "threads": torch.get_num_threads(),
    }


def write_random_images(root: Path, n: int, classes: int, size: int, seed: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i:05d}.png")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return {}
    with tempfile.TemporaryDirectory(prefix="fps_bench_") as tmp:
        tmp = Path(tmp)
        data = args.data
        if data is None:
            data = tmp / "images"
            write_random_images(data, args.images, args.classes, args.img_size or 224, args.seed)
        forwarded = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--json"]
        forwarded = _without(forwarded, "--data")
        runs = {}
        for method in METHODS:
            mask = tmp / f"{method}.safetensors"
            cmd = [
                sys.executable,
                __file__,
                *forwarded,
                "--data",
                str(data),
                "--worker",
                method,
                "--worker-mask",
                str(mask),
            ]
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise SystemExit(f"{method} run failed:\n{done.stderr[-4000:]}")
            runs[method] = json.loads(done.stdout.strip().splitlines()[-1])

        sys.path.insert(0, str(REPO))
        from fps_cli.compare import compare_masks
        from fps_cli.formats import read_mask

        comparison = compare_masks(read_mask(tmp / "fps.safetensors"), read_mask(tmp / "gps.safetensors"))
    fps, gps = runs["fps"], runs["gps"]
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "precision": args.precision,
        "img_size": args.img_size,
        "budget": args.budget,
        "fps": fps,
        "gps": gps,
        "ratios_gps_over_fps": {
            "pass_time": gps["pass_seconds"] / fps["pass_seconds"],
            "wall_time": gps["wall_seconds"] / fps["wall_seconds"],
            "peak_memory": gps["peak_mib"] / fps["peak_mib"],
            "pass_extra_memory": gps["pass_extra_mib"] / fps["pass_extra_mib"] if fps["pass_extra_mib"] else None,
        },
        "overlap": {
            "jaccard": comparison.jaccard,
            "overlap": comparison.overlap,
            "shared": comparison.total.intersection,
        },
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(_human(report))
    return report


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def _human(r: dict) -> str:
    lines = [
        f"{r['model']}, batch {r['batch_size']}, {r['precision']}, {r['fps']['device']}, {r['fps']['images']} images"
    ]
    unit = "MiB CUDA max allocated" if r["fps"]["memory_kind"].startswith("cuda") else "MiB peak RSS"
    for m in METHODS:
        x = r[m]
        lines.append(
            f"  {m}: pass {x['pass_seconds']:.1f} s ({x['images_per_second']:.2f} img/s), "
            f"wall {x['wall_seconds']:.1f} s, "
            f"peak {x['peak_mib']:.0f} {unit} (pass adds {x['pass_extra_mib']:.0f})"
        )
    q = r["ratios_gps_over_fps"]
    extra = f"{q['pass_extra_memory']:.1f}" if q["pass_extra_memory"] is not None else "n/a"
    lines.append(
        f"  GPS/FPS: pass time {q['pass_time']:.2f}x, wall {q['wall_time']:.2f}x, peak memory {q['peak_memory']:.2f}x "
        f"(pass memory {extra}x)"
    )
    o = r["overlap"]
    lines.append(f"  mask overlap: {o['overlap']:.1%} shared ({o['shared']:,} entries), Jaccard {o['jaccard']:.3f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
