"""Transfer on real digits, every method through the real CLI: full, linear, bias, random, weight, activation, fps, gps.

A small ViT (timm ``test_vit`` at 32x32) is pretrained from scratch on the *source* digits 0-4 and saved as
``source.safetensors`` (backbone only: the target head is new). Every method then fine-tunes it on the *target*
digits 5-9 from a few dozen images per class, through exactly the commands a user runs::

    fps select --model test_vit --checkpoint source.safetensors --img-size 32 --data target --method M --budget B
    fps train  --mask mask.safetensors --lr LR --no-augment ...
    fps eval   --delta delta.safetensors --data target_eval

and is scored on the held-out rest of the target digits (top-1), over several seeds. The data are scikit-learn's
bundled 8x8 digits (no download), upsampled to 32x32 PNG folders. One command, about 20-30 minutes on two shared
CPU cores::

    python benchmarks/transfer.py                      # writes benchmarks/out/transfer/transfer.{md,json}
    python benchmarks/transfer.py --update-results     # ... and the section of benchmarks/RESULTS.md
    python benchmarks/transfer.py --quick              # under 3 minutes: checks that every method gives a number

Learning rate, per family (full; linear; bias; the five sparse masks share one): unless ``--no-lr-search``, each
family's peak learning rate is the best of a small grid by top-1 on a held-out part of the target *train* split
(``lr_search/val``: the last ``--lr-val-per-class`` training images of each class; the selections for the search are
made on the rest), with seed 0; for the sparse family the criterion is the mean over the five sparse methods, so no
single criterion picks its own rate; a tie goes to the smaller rate. The test split is never used for any choice.

Selection cost: wall time of the ``fps select`` command (model build, checkpoint load, the data pass, selection,
writing the mask) and its peak resident memory above the resident size just before the command, measured in a
separate worker process per method (Linux: the peak is reset through ``/proc/self/clear_refs`` before every
selection). On this model (0.3 M parameters) both are dominated by fixed costs and, on shared cores, by the
machine's load (torch's worker threads wait on each other when other processes hold the cores); they say nothing
about ViT-B/16: ``benchmarks/select_fps_vs_gps.py`` is the cost benchmark.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's fps_cli, also when run as a script
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks' shared helpers, also when imported from elsewhere
import procfs  # noqa: E402

SPARSE = ("random", "weight", "activation", "fps", "gps")
METHODS = ("full", "linear", "bias", *SPARSE)
FAMILY = {"full": "full", "linear": "linear", "bias": "bias", **{m: "sparse" for m in SPARSE}}
# A first run with every grid a factor 3 lower chose the top rate of three families (full, linear, sparse): the grids
# were moved up once, for every family alike (benchmarks/RESULTS.md keeps both runs).
LR_GRID = {
    "full": (3e-4, 1e-3, 3e-3),
    "linear": (3e-3, 1e-2, 3e-2),
    "bias": (3e-3, 1e-2, 3e-2),
    "sparse": (3e-3, 1e-2, 3e-2),
}
# Used with --no-lr-search (and by --quick): the middle of each grid, fixed before any run.
FIXED_LR = {family: grid[1] for family, grid in LR_GRID.items()}
MODEL = ["--model", "test_vit", "--img-size", "32"]
SOURCE_CLASSES = (0, 1, 2, 3, 4)
TARGET_CLASSES = (5, 6, 7, 8, 9)
SECTION = "Transfer on digits (CPU)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "out" / "transfer")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--budget", type=float, default=0.05, help="budget of the sparse masks (fraction of all params)")
    p.add_argument("--train-per-class", type=int, default=30, help="target training images per class")
    p.add_argument("--lr-val-per-class", type=int, default=10, help="of those, held out for the lr search")
    p.add_argument("--epochs", type=int, default=12, help="fine-tuning epochs")
    p.add_argument("--source-epochs", type=int, default=25, help="pretraining epochs on the source digits")
    p.add_argument("--no-lr-search", action="store_true", help=f"use the fixed rates {FIXED_LR}")
    p.add_argument("--quick", action="store_true", help="tiny settings; only checks every method gives a number")
    p.add_argument("--update-results", action="store_true", help=f"write the '{SECTION}' section of RESULTS.md")
    p.add_argument("--results", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    p.add_argument("--select-worker", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs, args.source_epochs, args.train_per_class, args.lr_val_per_class = [0], 1, 1, 10, 3
        args.no_lr_search = True
    if not 0 < args.lr_val_per_class < args.train_per_class:
        p.error("--lr-val-per-class must be between 0 and --train-per-class")
    return args


# ------------------------------------------------------------------------------------------------------- data


def make_digits(root: Path, train_per_class: int, lr_val_per_class: int, quick: bool) -> dict[str, Path]:
    """Write the PNG folders (upsampled 32x32 grey digits) and return them by role.

    ``source/{train,val}``: digits 0-4 (80 / 20 %). ``target/train``: the first ``train_per_class`` images of each
    digit 5-9 in a seeded shuffle; ``target_eval/{train,test}``: the same training images and every other image of
    those digits (the test split). ``lr_search/{train,val}``: the target training images, the last
    ``lr_val_per_class`` of each class held out.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)  # [n, 8, 8], values 0..16 in the source
    rng = np.random.default_rng(0)
    order = rng.permutation(len(images))
    by_class: dict[int, list[int]] = {}
    for i in order:
        by_class.setdefault(int(digits.target[i]), []).append(int(i))

    def save(index: int, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).resize((32, 32), Image.BILINEAR).save(folder / f"{index:04d}.png")

    for c in SOURCE_CLASSES:
        items = by_class[c][:20] if quick else by_class[c]
        cut = int(len(items) * 0.8)
        for k, i in enumerate(items):
            save(i, root / "source" / ("train" if k < cut else "val") / str(c))
    for c in TARGET_CLASSES:
        items = by_class[c]
        train, test = items[:train_per_class], items[train_per_class:]
        test = test[:10] if quick else test
        for k, i in enumerate(train):
            save(i, root / "target" / "train" / str(c))
            save(i, root / "target_eval" / "train" / str(c))
            save(i, root / "lr_search" / ("train" if k < train_per_class - lr_val_per_class else "val") / str(c))
        for i in test:
            save(i, root / "target_eval" / "test" / str(c))
    return {name: root / name for name in ("source", "target", "target_eval", "lr_search")}


def _count(folder: Path) -> int:
    return sum(1 for p in folder.rglob("*.png"))


# ---------------------------------------------------------------------------------------------- pretraining


def pretrain_source(source: Path, out: Path, epochs: int, seed: int = 0) -> dict[str, Any]:
    """Pretrain test_vit from scratch on the source digits and save its backbone (no head) as safetensors.

    The images go through the same eval transform ``fps`` uses (timm's, for this model at 32x32), with random
    shifts of up to 2 pixels as the only augmentation; AdamW, cosine schedule, label smoothing 0.1.
    """
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from fps_cli.data import discover, eval_transform
    from fps_cli.models import ModelSpec, create_model
    from fps_cli.selector import seed_everything

    torch.manual_seed(seed)
    seed_everything(seed)
    model = create_model(ModelSpec("test_vit", pretrained=False, num_classes=len(SOURCE_CLASSES), img_size=32))
    tf = eval_transform(model, 32)
    folder = discover(source)

    def load(split):
        from PIL import Image

        xs = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in split.samples])
        return xs, torch.tensor([label for _, label in split.samples])

    x_train, y_train = load(folder.train)
    x_val, y_val = load(folder.val)
    batch, steps_per_epoch = 64, math.ceil(len(x_train) / 64)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=1e-3, total_steps=epochs * steps_per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(perm), batch):
            idx = perm[start : start + batch]
            xb = F.pad(x_train[idx], (2, 2, 2, 2), mode="replicate")  # random shifts of up to 2 pixels
            dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
            xb = xb[:, :, dy : dy + 32, dx : dx + 32]
            loss = F.cross_entropy(model(xb), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    with torch.no_grad():
        val_top1 = 100.0 * float((model(x_val).argmax(1) == y_val).float().mean())
    head = {n for n, _ in model.get_classifier().named_parameters(prefix="head")}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in head}
    save_file(state, str(out), metadata={"source": "digits 0-4", "epochs": str(epochs)})
    return {
        "source_train_images": len(x_train),
        "source_val_images": len(x_val),
        "source_val_top1": val_top1,
        "pretrain_seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------ selection


def select_worker(jobs_file: Path) -> None:
    """Run ``fps select`` (in this process, through the CLI) for every job in ``jobs_file``; record time and memory."""
    from typer.testing import CliRunner

    import fps_cli.selector  # noqa: F401 -- the imports are paid before any measurement
    from fps_cli.cli import app

    jobs = json.loads(jobs_file.read_text())
    runner = CliRunner()
    runner.invoke(app, jobs[0]["args"])  # warm-up, not measured: lazy imports and first-call costs
    results = []
    for job in jobs:
        reset = procfs.reset_peak()
        before = procfs.status_mib("VmRSS")
        started = time.perf_counter()
        result = runner.invoke(app, job["args"])
        seconds = time.perf_counter() - started
        peak = procfs.status_mib("VmHWM")
        if result.exit_code != 0:
            raise SystemExit(f"fps {' '.join(job['args'])} failed ({result.exit_code}):\n{result.output}")
        summary = json.loads(result.stdout)
        results.append(
            {
                **job["key"],
                "select_seconds": seconds,
                "pass_seconds": summary["pass_seconds"],
                "peak_rss_mib": peak,
                "peak_above_start_mib": (peak - before) if peak is not None and before is not None else None,
                "peak_reset": reset,
                "trainable": summary["trainable"],
                "trainable_fraction": summary["trainable_fraction"],
                "mask": job["mask"],
            }
        )
    jobs_file.with_suffix(".out.json").write_text(json.dumps(results))


def run_selections(jobs: list[dict[str, Any]], work: Path, one_process: bool) -> list[dict[str, Any]]:
    """Run the selection jobs in worker processes: one per method (fresh peaks), or one for all with ``one_process``."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for job in jobs:
        groups.setdefault("all" if one_process else job["key"]["method"], []).append(job)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    results = []
    for name, group in groups.items():
        jobs_file = work / f"select_{name}.json"
        jobs_file.write_text(json.dumps(group))
        subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--select-worker", str(jobs_file)], check=True, env=env
        )
        results += json.loads(jobs_file.with_suffix(".out.json").read_text())
    return results


def select_args(method: str, data: Path, checkpoint: Path, mask: Path, seed: int, budget: float) -> list[str]:
    args = ["select", *MODEL, "--checkpoint", str(checkpoint), "--data", str(data), "--method", method]
    args += ["--seed", str(seed), "-o", str(mask), "--no-scores", "--num-workers", "0", "--batch-size", "64"]
    args += ["--force", "--json", "-q"]
    if method in SPARSE:
        args += ["--budget", str(budget)]
    if method == "gps":
        args += ["--no-augment"]  # both views the eval transform, as fine-tuning sees the images
    return args


# ------------------------------------------------------------------------------------------- train and eval


def fps_cli(runner, *args: str) -> dict[str, Any]:
    from fps_cli.cli import app

    result = runner.invoke(app, [str(a) for a in args])
    if result.exit_code != 0:
        raise RuntimeError(f"fps {' '.join(map(str, args))} failed ({result.exit_code}):\n{result.output}")
    return json.loads(result.stdout)


def train(runner, mask: Path, delta: Path, lr: float, seed: int, epochs: int, data: Path | None = None):
    args = ["train", "--mask", mask, "-o", delta, "--epochs", epochs, "--lr", lr, "--seed", seed, "--no-augment"]
    args += ["--warmup-epochs", "1", "--batch-size", "32", "--num-workers", "0", "--force", "--json", "-q"]
    if data is not None:
        args += ["--data", data]
    return fps_cli(runner, *args)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


# ------------------------------------------------------------------------------------------------- the table


def summarize(runs: list[dict[str, Any]], methods: list[str]) -> list[dict[str, Any]]:
    rows = []
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        top1 = mean_std([r["top1"] for r in mine])
        rows.append(
            {
                "method": method,
                "lr": mine[0]["lr"],
                "seeds": [r["seed"] for r in mine],
                "top1": [r["top1"] for r in mine],
                "top1_mean": top1[0],
                "top1_std": top1[1],
                "trainable_percent": 100.0 * statistics.fmean(r["trainable_fraction"] for r in mine),
                "select_seconds": statistics.fmean(r["select_seconds"] for r in mine),
                "pass_seconds": statistics.fmean(r["pass_seconds"] for r in mine),
                "select_peak_above_start_mib": max(r["peak_above_start_mib"] or 0.0 for r in mine),
                "select_peak_rss_mib": max(r["peak_rss_mib"] or 0.0 for r in mine),
                "train_seconds": statistics.fmean(r["train_seconds"] for r in mine),
            }
        )
    return rows


def ordering(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Does ``every sparse mask > bias > linear`` hold on the means?"""
    by = {r["method"]: r["top1_mean"] for r in rows}
    if not {"bias", "linear"} <= set(by):
        return {}
    sparse = {m: by[m] for m in SPARSE if m in by}
    return {
        "bias_gt_linear": by["bias"] > by["linear"],
        "sparse_gt_bias": {m: v > by["bias"] for m, v in sparse.items()},
        "holds": by["bias"] > by["linear"] and all(v > by["bias"] for v in sparse.values()),
    }


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"## {SECTION}",
        "",
        f"`python benchmarks/transfer.py{' --quick' if s['quick'] else ''}` — test_vit (0.3 M parameters, 32x32) "
        f"pretrained from scratch on digits 0-4 ({report['source']['source_train_images']} images, source val top-1 "
        f"{report['source']['source_val_top1']:.1f}%), fine-tuned on digits 5-9 from {s['train_per_class']} images "
        f"per class, tested on the other {s['test_images']} images of those digits. Sparse masks at budget "
        f"{s['budget']:g} (fraction of all parameters, head and biases included); {s['epochs']} epochs of AdamW, "
        f"cosine schedule, 1 warmup epoch, batch 32, no augmentation; seeds {s['seeds']} (mask seed = training seed). "
        f"Mean ± sample std over the seeds. Wall time {report['wall_seconds'] / 60:.1f} min on {s['cpus']} CPU cores "
        f"(load average {report['load_before']} before, {report['load_after']} after: the cores were shared).",
        "",
        "| method | lr | test top-1 (%) | per seed | trainable (%) | selection time (s) | selection peak (MiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        per_seed = ", ".join(f"{v:.1f}" for v in r["top1"])
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['top1_mean']:.1f} ± {r['top1_std']:.1f} | {per_seed} | "
            f"{r['trainable_percent']:.2f} | {r['select_seconds']:.2f} | {r['select_peak_above_start_mib']:.1f} |"
        )
    lines += [
        "",
        "Selection time: wall time of the `fps select` command (model build and checkpoint load included; the data "
        "pass alone for fps / gps is in the JSON as `pass_seconds`). Selection peak: resident memory above the "
        "process's size just before the command. Both are dominated by fixed costs on a model this small.",
        "",
    ]
    lr = report["lr"]
    if lr["searched"]:
        lines.append(
            "Learning rates: per family, best top-1 on a held-out part of the target training split "
            f"({s['lr_val_per_class']} images per class; seed 0; sparse family by the mean over the five sparse "
            "masks). Grid and scores: "
            + "; ".join(
                f"{fam}: " + ", ".join(f"{k}: {v:.1f}" for k, v in lr["search"][fam].items()) for fam in lr["search"]
            )
            + "."
        )
    else:
        lines.append(f"Learning rates: fixed, not searched: {lr['chosen']}.")
    order = report["ordering"]
    if order:
        lines += [
            "",
            "Ordering every sparse mask > bias > linear (on the means): "
            f"**{'holds' if order['holds'] else 'does not hold'}**"
            f" (bias > linear: {order['bias_gt_linear']}; each sparse mask > bias: {order['sparse_gt_bias']}).",
        ]
    return "\n".join(lines) + "\n"


def update_results(path: Path, section: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, keeping every other section."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    head = f"## {SECTION}"
    if head in text:
        before, _, rest = text.partition(head)
        after = rest.split("\n## ", 1)
        tail = "\n## " + after[1] if len(after) > 1 else ""
        text = before + section + tail
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


# --------------------------------------------------------------------------------------------------- main


def _load() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.select_worker is not None:
        select_worker(args.select_worker)
        return {}
    from typer.testing import CliRunner

    started, load_before = time.perf_counter(), _load()
    work = args.out_dir
    work.mkdir(parents=True, exist_ok=True)
    for sub in ("data", "masks", "deltas"):
        (work / sub).mkdir(exist_ok=True)
    dirs = make_digits(work / "data", args.train_per_class, args.lr_val_per_class, args.quick)
    log = (lambda *a: None) if args.quick else (lambda *a: print(*a, file=sys.stderr, flush=True))
    checkpoint = work / "source.safetensors"
    source = pretrain_source(dirs["source"], checkpoint, args.source_epochs)
    log(f"source model: val top-1 {source['source_val_top1']:.1f}% ({source['pretrain_seconds']:.0f} s)")

    # Every selection, in worker processes: the lr-search masks (seed 0, on lr_search/train) and the final ones.
    jobs = []
    for method in args.methods:
        if not args.no_lr_search:
            mask = work / "masks" / f"lr_{method}.safetensors"
            a = select_args(method, dirs["lr_search"], checkpoint, mask, 0, args.budget)
            jobs.append({"key": {"method": method, "seed": 0, "stage": "lr"}, "args": a, "mask": str(mask)})
        for seed in args.seeds:
            mask = work / "masks" / f"{method}_{seed}.safetensors"
            a = select_args(method, dirs["target"], checkpoint, mask, seed, args.budget)
            jobs.append({"key": {"method": method, "seed": seed, "stage": "final"}, "args": a, "mask": str(mask)})
    selections = run_selections(jobs, work, one_process=args.quick)
    log(f"{len(selections)} selections done ({time.perf_counter() - started:.0f} s)")

    runner = CliRunner()
    lr_report: dict[str, Any] = {"searched": not args.no_lr_search, "chosen": {}, "search": {}}
    families = sorted({FAMILY[m] for m in args.methods})
    if args.no_lr_search:
        lr_report["chosen"] = {f: FIXED_LR[f] for f in families}
    else:
        for family in families:
            members = [s for s in selections if s["stage"] == "lr" and FAMILY[s["method"]] == family]
            scores = {}
            for lr in LR_GRID[family]:
                tops = []
                for sel in members:
                    delta = work / "deltas" / f"lr_{sel['method']}_{lr:g}.safetensors"
                    out = train(runner, Path(sel["mask"]), delta, lr, 0, args.epochs)
                    tops.append(out["metrics"]["val_top1"])
                scores[f"{lr:g}"] = statistics.fmean(tops)
                log(f"lr search {family} lr {lr:g}: held-out top-1 {scores[f'{lr:g}']:.1f}")
            lr_report["search"][family] = scores
            lr_report["chosen"][family] = float(max(scores, key=lambda k: (scores[k], -float(k))))

    runs = []
    for sel in (s for s in selections if s["stage"] == "final"):
        method, seed = sel["method"], sel["seed"]
        lr = lr_report["chosen"][FAMILY[method]]
        delta = work / "deltas" / f"{method}_{seed}.safetensors"
        trained = train(runner, Path(sel["mask"]), delta, lr, seed, args.epochs)
        evaluated = fps_cli(
            runner, "eval", "--delta", delta, "--data", dirs["target_eval"], "--num-workers", "0", "--json", "-q"
        )
        runs.append({**sel, "lr": lr, "top1": evaluated["top1"], "train_seconds": trained["seconds"]})
        log(f"{method} seed {seed}: test top-1 {evaluated['top1']:.1f}% ({time.perf_counter() - started:.0f} s)")

    rows = summarize(runs, args.methods)
    report = {
        "settings": {
            **{k: v for k, v in vars(args).items() if k in ("seeds", "budget", "epochs", "quick")},
            "train_per_class": args.train_per_class,
            "lr_val_per_class": args.lr_val_per_class,
            "source_epochs": args.source_epochs,
            "test_images": _count(dirs["target_eval"] / "test"),
            "cpus": os.cpu_count(),
            "torch_threads": __import__("torch").get_num_threads(),
            "python": platform.python_version(),
        },
        "source": source,
        "lr": lr_report,
        "rows": rows,
        "ordering": ordering(rows),
        "runs": runs,
        "wall_seconds": time.perf_counter() - started,
        "load_before": load_before,
        "load_after": _load(),
    }
    (work / "transfer.json").write_text(json.dumps(report, indent=1))
    section = markdown(report)
    (work / "transfer.md").write_text(section)
    if args.update_results:
        update_results(args.results, section)
    print(section)
    return report


if __name__ == "__main__":
    main()
