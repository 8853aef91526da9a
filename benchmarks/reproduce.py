"""The paper's comparison on FGVC / VTAB-1k: select -> train -> eval for every (task, method), resumable.

For users who have the data. One command runs every cell through the real CLI (``python -m fps_cli select``,
``train``, ``eval``, each its own process), prints a paper-style table, and writes ``results.json`` and
``results.md`` under ``--out-dir``::

    python benchmarks/reproduce.py --root /data/peft --tasks cub_2011 dtd svhn --methods fps gps full linear bias

Run it again after an interruption: finished cells are skipped (``<out>/<task>/<method>/result.json``), a mask or
delta already written is reused, and an interrupted training continues with ``fps train --resume``.

Data layout (one folder per task under ``--root``; task names as in :data:`RECIPES`)::

    ROOT/<task>/train/<class>/*.jpg     # VTAB-1k: the 1000 train800val200 images; FGVC: the training split
    ROOT/<task>/test/<class>/*.jpg      # the test split (val/ or validation/ also work)

VTAB-1k as commonly distributed (the VPT / NOAH ``vtab-1k`` release: ``<task>/images/...`` with list files of
``<relative path> <label>`` lines, ``train800val200.txt`` and ``test.txt``) is turned into that layout, with
symbolic links, by ``python benchmarks/reproduce.py --prepare-vtab SRC_TASK_DIR ROOT/<task>``. FGVC datasets
(CUB-200-2011, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars) come in per-dataset formats: put their
train / test splits (VPT's splits) into class folders the same way.

Default recipe: GPS's released per-task training scripts (github.com/FightingFighting/GPS,
``train_scripts/vit/{fgvc,vtab}/<task>/train_gps.sh``), as far as ``fps train`` can express them:

- taken: the per-task learning rate, batch size and top-K per neuron (``--times_para``, the mask size) of each
  script; 100 epochs; Adam with weight decay 0 (here AdamW with ``--weight-decay 0``, the same update); 10 warmup
  epochs then cosine decay; label smoothing 0 on VTAB (``--smoothing 0``) and timm's default 0.1 on FGVC; no
  augmentation on VTAB (``--no-aug``; here ``--no-augment``, timm's eval transform); augmentation on FGVC
  (``--simple-aug``; here timm's train transform); GPS selection with its supervised contrastive loss on
  augmented views (``--contrastive --contrast-aug``; ``fps select --method gps`` defaults).
- not reproduced: drop-path (0.1-0.2 on a few tasks), EMA of the weights (FGVC), warmup from 1e-7 and a cosine
  floor of 1e-8 (here linear warmup from lr/steps and a floor of 0), ``--direct-resize`` (here timm's resize and
  center crop), mixed precision (pass ``--precision bf16`` on a GPU), GPS's ``vit_base_patch16_224_in21k``
  weights (the default here is timm's ``vit_base_patch16_224.augreg_in21k``; any ``--model`` works).
- our own choices, not GPS's: every sparse method (fps, gps, weight, activation, random) uses GPS's recipe;
  ``linear`` and ``bias`` too; ``full`` uses a tenth of the task's learning rate (full fine-tuning diverges at
  rates that suit sparse masks); override any of it with ``--lr METHOD=LR``. A task without a recipe (your own
  folder) gets :data:`DEFAULT_RECIPE`.

Text: ``python benchmarks/reproduce.py text-quality [OPTIONS]`` runs ``benchmarks/text_quality.py`` (the quality
table on the real all-MiniLM-L6-v2 weights and WordNet's noun supersenses; see its ``--help``) with those options.

Published numbers: the GPS paper's abstract (arXiv 2312.10136v1) gives means only: GPS 91.78% on FGVC and 73.1% on
VTAB-1k, full fine-tuning 88.45% and 65.57%. Those are printed beside our means when every task of the group was
run. Its per-task numbers were not available to us, so the per-task "published" column is empty.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's fps_cli, also when run as a script
METHODS = ("full", "linear", "bias", "random", "weight", "activation", "fps", "gps")
SPARSE = ("random", "weight", "activation", "fps", "gps")
FULL_LR_SCALE = 0.1


@dataclass(frozen=True)
class Recipe:
    """One task's training settings. ``topk``: GPS's ``--times_para`` (entries per output neuron)."""

    group: str
    lr: float
    batch_size: int
    topk: int


# From github.com/FightingFighting/GPS train_scripts/vit/<group>/<task>/train_gps.sh (lr, bz, times_para).
RECIPES: dict[str, Recipe] = {
    "cub_2011": Recipe("fgvc", 3e-3, 32, 2),
    "nabirds": Recipe("fgvc", 1e-4, 32, 20),
    "oxford_flowers": Recipe("fgvc", 1e-3, 32, 1),
    "stanford_dogs": Recipe("fgvc", 1e-4, 64, 1),
    "stanford_cars": Recipe("fgvc", 5e-4, 32, 15),
    "caltech101": Recipe("vtab-natural", 2e-3, 16, 1),
    "cifar_100": Recipe("vtab-natural", 1e-2, 32, 1),
    "dtd": Recipe("vtab-natural", 1.5e-3, 16, 1),
    "flowers102": Recipe("vtab-natural", 8e-3, 32, 1),
    "pets": Recipe("vtab-natural", 8e-3, 32, 1),
    "svhn": Recipe("vtab-natural", 5e-3, 32, 1),
    "sun397": Recipe("vtab-natural", 1.5e-3, 16, 1),
    "patch_camelyon": Recipe("vtab-specialized", 1.5e-3, 16, 2),
    "eurosat": Recipe("vtab-specialized", 1e-3, 32, 1),
    "resisc45": Recipe("vtab-specialized", 1e-3, 32, 1),
    "diabetic_retinopathy": Recipe("vtab-specialized", 1.5e-3, 16, 2),
    "clevr_count": Recipe("vtab-structured", 1e-3, 32, 1),
    "clevr_dist": Recipe("vtab-structured", 8e-3, 32, 1),
    "dmlab": Recipe("vtab-structured", 1.5e-3, 16, 1),
    "kitti": Recipe("vtab-structured", 2e-3, 16, 1),
    "dsprites_loc": Recipe("vtab-structured", 7e-3, 32, 1),
    "dsprites_ori": Recipe("vtab-structured", 5e-3, 32, 1),
    "smallnorb_azi": Recipe("vtab-structured", 8e-3, 32, 1),
    "smallnorb_ele": Recipe("vtab-structured", 8e-3, 32, 1),
}
DEFAULT_RECIPE = Recipe("other", 1e-3, 32, 1)
# Means from the GPS paper's abstract (arXiv 2312.10136v1); per-task numbers: not available to us.
PUBLISHED_MEANS = {("fgvc", "gps"): 91.78, ("fgvc", "full"): 88.45, ("vtab", "gps"): 73.1, ("vtab", "full"): 65.57}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", type=Path, help="folder of task folders (ROOT/<task>/{train,test}/<class>/...)")
    p.add_argument("--tasks", nargs="+", help="task folder names (default: every one of RECIPES found under --root)")
    p.add_argument("--methods", nargs="+", default=["fps", "gps", "full", "linear", "bias"], choices=METHODS)
    p.add_argument("--model", default="vit_base_patch16_224.augreg_in21k")
    p.add_argument("--no-pretrained", action="store_true", help="randomly initialised model (smoke tests)")
    p.add_argument("--checkpoint", type=Path, help="local weights instead of the hub")
    p.add_argument("--img-size", type=int)
    p.add_argument("--budget", type=float, help="a fraction for every sparse mask, instead of GPS's per-task top-K")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--warmup-epochs", type=float, default=10)
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=LR", help="override a method's rate")
    p.add_argument("--batch-size", type=int, help="override every task's batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16"))
    p.add_argument("--num-workers", type=int)
    p.add_argument("--out-dir", type=Path, default=Path("reproduce_runs"))
    p.add_argument("--prepare-vtab", nargs=2, type=Path, metavar=("SRC", "DST"), help="list files -> class folders")
    args = p.parse_args(argv)
    if args.prepare_vtab is None and args.root is None:
        p.error("--root is required")
    try:
        args.lr_override = {m: float(v) for m, _, v in (item.partition("=") for item in args.lr)}
    except ValueError:
        p.error("--lr takes METHOD=LR, e.g. --lr full=1e-4")
    unknown = set(args.lr_override) - set(METHODS)
    if unknown:
        p.error(f"--lr: unknown method {', '.join(sorted(unknown))}")
    return args


# ------------------------------------------------------------------------------------------ data preparation


def prepare_vtab(src: Path, dst: Path) -> dict[str, int]:
    """Class folders (symbolic links) from a VTAB-1k task folder with ``train800val200.txt`` and ``test.txt``."""
    counts = {}
    for split, listing in (("train", "train800val200.txt"), ("test", "test.txt")):
        lines = (src / listing).read_text().split("\n")
        n = 0
        for line in filter(None, (raw.strip() for raw in lines)):
            rel, label = line.rsplit(maxsplit=1)
            folder = dst / split / f"{int(label):03d}"
            folder.mkdir(parents=True, exist_ok=True)
            link = folder / Path(rel).name
            if not link.exists():
                link.symlink_to((src / rel).resolve())
            n += 1
        counts[split] = n
    return counts


# ------------------------------------------------------------------------------------------------ one cell


def recipe_for(task: str) -> Recipe:
    return RECIPES.get(task, DEFAULT_RECIPE)


def method_lr(method: str, recipe: Recipe, overrides: dict[str, float]) -> float:
    if method in overrides:
        return overrides[method]
    return recipe.lr * FULL_LR_SCALE if method == "full" else recipe.lr


def plan(cell: Path) -> list[str]:
    """What is left to do in a cell, from the files it holds: ``select``, ``train`` / ``resume``, ``eval``."""
    if (cell / "result.json").exists():
        return []
    steps = [] if (cell / "mask.safetensors").exists() else ["select"]
    if not (cell / "delta.safetensors").exists():
        steps.append("resume" if (cell / "delta.ckpt").exists() else "train")
    return [*steps, "eval"]


def cell_commands(task: str, method: str, data: Path, cell: Path, args: argparse.Namespace) -> dict[str, list[str]]:
    recipe = recipe_for(task)
    model = ["--model", args.model]
    model += ["--no-pretrained"] if args.no_pretrained else []
    model += ["--checkpoint", str(args.checkpoint)] if args.checkpoint else []
    model += ["--img-size", str(args.img_size)] if args.img_size else []
    common = ["--device", args.device, "--json"]
    common += ["--num-workers", str(args.num_workers)] if args.num_workers is not None else []
    batch = str(args.batch_size or recipe.batch_size)
    mask, delta = cell / "mask.safetensors", cell / "delta.safetensors"
    # Selection and training see the training split alone (DATA/train has class folders and no test split, so
    # training does not evaluate the test set every epoch); evaluation reads DATA/test.
    select = [
        "select",
        *model,
        "--data",
        str(data / "train"),
        "--method",
        method,
        "--seed",
        str(args.seed),
        "-o",
        str(mask),
    ]
    select += ["--no-scores", "--batch-size", batch, "--precision", args.precision, "--force", *common]
    if method in SPARSE:
        select += ["--budget", str(args.budget)] if args.budget else ["--topk-per-neuron", str(recipe.topk)]
    vtab = recipe.group.startswith("vtab")
    train = ["train", "--mask", str(mask), "-o", str(delta), "--epochs", str(args.epochs)]
    train += ["--lr", f"{method_lr(method, recipe, args.lr_override):g}", "--optimizer", "adamw", "--weight-decay", "0"]
    train += ["--warmup-epochs", f"{args.warmup_epochs:g}", "--batch-size", batch, "--seed", str(args.seed)]
    train += ["--label-smoothing", "0" if vtab else "0.1", "--precision", args.precision, *common]
    train += ["--no-augment"] if vtab else []
    evaluate = ["eval", "--delta", str(delta), "--data", str(data), "--batch-size", batch, *common]
    evaluate += ["--precision", args.precision]
    return {"select": select, "train": [*train, "--force"], "resume": [*train, "--resume"], "eval": evaluate}


Runner = Callable[[list[str], Path], dict[str, Any]]


def subprocess_runner(command: list[str], log: Path) -> dict[str, Any]:
    """``python -m fps_cli COMMAND`` in its own process; its stderr goes to ``log``; returns its JSON."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    with open(log, "a") as err:
        done = subprocess.run(
            [sys.executable, "-m", "fps_cli", *command], stdout=subprocess.PIPE, stderr=err, text=True, env=env
        )
    if done.returncode != 0:
        raise RuntimeError(f"fps {command[0]} failed (exit {done.returncode}); see {log}")
    return json.loads(done.stdout)


def run_cell(task: str, method: str, data: Path, args: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    cell = args.out_dir / task / method
    cell.mkdir(parents=True, exist_ok=True)
    steps = plan(cell)
    if not steps:
        return {**json.loads((cell / "result.json").read_text()), "status": "skipped (finished)"}
    commands = cell_commands(task, method, data, cell, args)
    log = cell / "log.txt"
    outputs = {}
    for step in steps:  # one at a time: whatever finished before an interruption is reused by the next run
        outputs[step] = runner(commands[step], log)
    result = {
        "task": task,
        "method": method,
        "group": recipe_for(task).group,
        "top1": outputs["eval"]["top1"],
        "trainable_percent": _trainable_percent(cell / "mask.safetensors"),
        "lr": method_lr(method, recipe_for(task), args.lr_override),
        "resumed": "resume" in steps,
        "steps": steps,
    }
    (cell / "result.json").write_text(json.dumps(result))
    return {**result, "status": "ran " + ", ".join(steps)}


def _trainable_percent(mask_path: Path) -> float:
    from fps_cli.formats import read_mask

    mask = read_mask(mask_path)
    return 100.0 * mask.trainable / mask.total_params


# ------------------------------------------------------------------------------------------------- the table


def table(results: list[dict[str, Any]], methods: list[str], tasks: list[str]) -> str:
    """Paper-style: one row per task, one column per method (test top-1 %), then the group means."""
    by = {(r["task"], r["method"]): r for r in results}
    lines = ["| task | " + " | ".join(methods) + " | published (GPS paper) |", "|---" * (len(methods) + 2) + "|"]
    for task in tasks:
        cells = [f"{by[task, m]['top1']:.2f}" if (task, m) in by else "" for m in methods]
        lines.append(f"| {task} | " + " | ".join(cells) + " |  |")
    lines.append("| trainable % (mean) | " + " | ".join(_mean_cell(results, m, "trainable_percent") for m in methods))
    lines[-1] += " |  |"
    groups = {"fgvc": [t for t, r in RECIPES.items() if r.group == "fgvc"]}
    groups["vtab"] = [t for t, r in RECIPES.items() if r.group.startswith("vtab")]
    for group, members in groups.items():
        if not set(members) <= set(tasks):
            continue  # a published mean is comparable only over the whole group
        ours = [_mean([by[t, m]["top1"] for t in members if (t, m) in by], len(members)) for m in methods]
        published = ", ".join(f"{m} {PUBLISHED_MEANS[group, m]}" for m in methods if (group, m) in PUBLISHED_MEANS)
        cells = [f"{v:.2f}" if v is not None else "" for v in ours]
        lines.append(f"| **{group} mean** | " + " | ".join(cells) + f" | {published} |")
    return "\n".join(lines) + "\n"


def _mean(values: list[float], expected: int) -> float | None:
    return statistics.fmean(values) if values and len(values) == expected else None


def _mean_cell(results: list[dict[str, Any]], method: str, key: str) -> str:
    values = [r[key] for r in results if r["method"] == method]
    return f"{statistics.fmean(values):.3f}" if values else ""


# ------------------------------------------------------------------------------------------------------ main


def find_tasks(root: Path, tasks: list[str] | None) -> list[str]:
    if tasks:
        missing = [t for t in tasks if not (root / t).is_dir()]
        if missing:
            raise SystemExit(f"no task folder {', '.join(str(root / t) for t in missing)} (see --help for the layout)")
        return tasks
    found = [t for t in RECIPES if (root / t).is_dir()]
    if not found:
        raise SystemExit(f"no task folder of {', '.join(RECIPES)} under {root}; pass --tasks")
    return found


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess_runner) -> list[dict[str, Any]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["text-quality"]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import text_quality

        text_quality.main(argv[1:])  # prints the table and writes it under its --out-dir
        return []
    args = parse_args(argv)
    if args.prepare_vtab is not None:
        counts = prepare_vtab(*args.prepare_vtab)
        print(f"wrote {counts['train']} train and {counts['test']} test links under {args.prepare_vtab[1]}")
        return []
    tasks = find_tasks(args.root, args.tasks)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for task in tasks:
        for method in args.methods:
            result = run_cell(task, method, args.root / task, args, runner)
            print(f"{task} / {method}: top-1 {result['top1']:.2f}% ({result['status']})", file=sys.stderr, flush=True)
            results.append(result)
    text = table(results, args.methods, tasks)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=1))
    (args.out_dir / "results.md").write_text(text)
    print(text)
    return results


if __name__ == "__main__":
    main()
