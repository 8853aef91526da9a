"""``fps train`` and ``fps eval`` as library calls: sparse fine-tuning of a masked model, and its evaluation.

The loop is the one a timm user knows: AdamW (or SGD with momentum) over the trainable values only, a per-step
linear warmup then cosine schedule, label smoothing, timm's train transform, autocast (``bf16`` / ``fp16``, with
a GradScaler for ``fp16``), gradient accumulation and clipping, top-1 / top-5 on the validation split after
every epoch, and a resumable checkpoint at the end of every epoch. The sparse mechanism itself lives in
:mod:`.sparse`; the file formats in :mod:`.formats`. This module never prints: progress is reported through an
``on_event`` callback receiving plain dicts (the CLI turns them into stderr lines and a JSON-lines log).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DistributedSampler

from . import records, sampled_product
from .activations import autocast
from .data import default_num_workers
from .distributed import Dist, average_gradients, batch_shard, sum_floats
from .errors import DataError, FileFormatError, ModelError, OutputExistsError, TrainingError
from .formats import Delta, Mask, weights_digest
from .hub import torch_load_data
from .models import ModelSpec, create_model, model_name, model_num_classes
from .options import TrainConfig as TrainConfig  # re-exported: the training options live in options.py
from .outputs import Transaction, recover
from .selector import base_digest, seed_everything
from .sparse import SparseParams, attach, extract, recompute_sparse_weights

CHECKPOINT_VERSION = 1
# Provenance keys that identify the base model a mask or delta belongs to.
IDENTITY_KEYS = ("model", "pretrained", "pretrained_tag", "checkpoint", "init_seed", "num_classes", "img_size")

Event = dict[str, Any]


# Options that may change when resuming: a run that hit a NaN loss can go on from its last good epoch with a
# lower --lr or with --clip-grad. Any other difference makes the checkpoint belong to another run.
RESUME_MAY_CHANGE = ("lr", "clip_grad")


@dataclass
class TrainResult:
    """What training produced.

    Attributes:
        delta: the trained change with its provenance (base identity, checksums, configuration, final metrics).
        metrics: final metrics (validation top-1 / top-5 / loss when there is a validation split).
        history: one record per epoch.
        resumed_from: the epoch the run resumed after (0 for a fresh run).
        seconds: wall time of this process's training.
        model: the fine-tuned model, deltas attached (see :mod:`.sparse`), on the training device.
        optimizer_state: (elements of per-element optimizer state, scalar entries such as step counters).
    """

    delta: Delta
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int = 0
    seconds: float = 0.0
    model: nn.Module | None = None
    optimizer_state: tuple[int, int] = (0, 0)


# --------------------------------------------------------------------------------------------- the schedule


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """Learning-rate multiplier of optimizer step ``step``: linear warmup to 1, then cosine towards 0.

    Step ``0`` of a warmup of ``W`` steps uses ``1 / W``, so no step is wasted at a zero learning rate.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(sparse: SparseParams, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD over the trainable values only, with timm's weight-decay rule.

    Weight decay applies to the selected deltas (entries of weight matrices) and to fully trained tensors of two
    or more dimensions; biases and other 1-D fully trained tensors get none (timm's ``param_groups_weight_decay``).
    """
    decay = [d.delta for d in sparse.deltas.values()] + [p for p in sparse.full.values() if p.ndim > 1]
    no_decay = [p for p in sparse.full.values() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    groups = [g for g in groups if g["params"]]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), eps=1e-8)


def optimizer_state_numel(optimizer: torch.optim.Optimizer) -> tuple[int, int]:
    """(elements in per-element state tensors, scalar entries such as AdamW's step counters)."""
    elements, scalars = 0, 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, Tensor) and value.dim() > 0:
                elements += value.numel()
            else:
                scalars += 1
    return elements, scalars


# --------------------------------------------------------------------------------------- model and its base


def spec_from_provenance(
    prov: Mapping[str, Any],
    *,
    model: str | None = None,
    pretrained: bool | None = None,
    checkpoint: Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    offline: bool = False,
    trust_remote_code: bool = False,
    task: str | None = None,
) -> ModelSpec:
    """The model a mask or delta records (its task included), with any of its parts overridden.

    ``trust_remote_code`` is never read from the file: only the user can allow a model's own code to run.
    """
    if "model" not in prov:
        raise FileFormatError("the file's header lacks the model provenance (fps.model)")
    recorded_ckpt = prov.get("checkpoint")
    return ModelSpec(
        name=model if model is not None else prov["model"],
        pretrained=pretrained if pretrained is not None else bool(prov.get("pretrained", True)),
        checkpoint=checkpoint if checkpoint is not None else (Path(recorded_ckpt) if recorded_ckpt else None),
        num_classes=num_classes if num_classes is not None else prov.get("num_classes"),
        img_size=img_size if img_size is not None else prov.get("img_size"),
        offline=offline,
        trust_remote_code=trust_remote_code,
        task=task if task is not None else prov.get("task"),
    )


# A mismatch message names this many parameters per kind, then "… N more".
SHOWN_NAMES = 5


def _names(names: list[str]) -> str:
    more = f" … {len(names) - SHOWN_NAMES} more" if len(names) > SHOWN_NAMES else ""
    return ", ".join(names[:SHOWN_NAMES]) + more


def shape_problems(shapes: Mapping[str, tuple[int, ...]], model: nn.Module) -> list[str]:
    """Every way the recorded parameter shapes differ from ``model``'s (names the file has that the model lacks,
    parameters the file lacks, shape mismatches), counted, with the first few of each named."""
    own = {n: tuple(p.shape) for n, p in model.named_parameters()}
    unknown = [n for n in shapes if n not in own]
    missing = [n for n in own if n not in shapes]
    mismatched = [f"{n} {list(shapes[n])} vs {list(own[n])}" for n in shapes if n in own and shapes[n] != own[n]]
    kinds = (
        ("parameter the model lacks", "parameters the model lacks", unknown),
        ("model parameter the file lacks", "model parameters the file lacks", missing),
        ("shape mismatch (file vs model)", "shape mismatches (file vs model)", mismatched),
    )
    return [f"{len(names)} {one if len(names) == 1 else many}: {_names(names)}" for one, many, names in kinds if names]


def mismatch_message(
    source: str, prov: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], model: nn.Module, built: str
) -> str | None:
    """The error for a file whose recorded parameters do not fit ``model`` (None when they fit): first the model
    the file was made for and the one built now, with their sizes, then the problems, one per line."""
    problems = shape_problems(shapes, model)
    if not problems:
        return None
    made = f"{prov.get('model')} (num_classes={prov.get('num_classes')}, img_size={prov.get('img_size') or 'default'})"
    recorded = sum(math.prod(s) for s in shapes.values())
    own = sum(p.numel() for p in model.parameters())
    return (
        f"{source} does not fit the model:\n  made for   {made}, {recorded:,} parameters\n"
        f"  built now  {built}, {own:,} parameters\n  "
        + "\n  ".join(problems)
        + "\n  build the model the file records (drop --model / --img-size / --num-classes), or make a new file for it"
    )


def build_base(
    spec: ModelSpec,
    shapes: Mapping[str, tuple[int, ...]],
    prov: Mapping[str, Any],
    source: str,
) -> nn.Module:
    """Rebuild the base model a mask or delta was made on, and check it is the same one.

    A randomly initialised (``--no-pretrained``) base is rebuilt from the seed it was built with
    (``init_seed``), so its weights, and a new head's initialisation, match.

    Raises:
        FileFormatError: the model's parameters do not fit the recorded shapes (every mismatch listed), or its
            weights are not the ones recorded (base checksum).
    """
    seed_everything(int(prov.get("init_seed") or 0))
    model = create_model(spec)
    built = f"{spec.name} (num_classes={_num_classes(model)}, img_size={spec.img_size or 'default'})"
    message = mismatch_message(source, prov, shapes, model, built)
    if message:
        raise FileFormatError(message)
    recorded = prov.get("base_sha256")
    if recorded:
        digest = base_digest(model)
        if digest != recorded:
            raise FileFormatError(
                f"{source} was made on other weights than {spec.name} as loaded now (base checksum "
                f"{recorded[:12]}… vs {digest[:12]}…); pass the same --model / --checkpoint / --pretrained as "
                "when it was made"
            )
    return model


def _num_classes(model: nn.Module) -> int | None:
    return model_num_classes(model)


def _check_classes(classes: list[str], num_classes: int | None, root: Path, source: str) -> None:
    if num_classes is not None and len(classes) != num_classes:
        raise DataError(
            f"{root} has {len(classes)} classes but {source} is for a {num_classes}-class head; pass --data with "
            f"{num_classes} class folders, or select a new mask on this folder"
        )


def training_data(
    data_dir: Any,
    prov: Mapping[str, Any],
    source: str,
    spec: ModelSpec | None = None,
    data_options: Mapping[str, Any] | None = None,
) -> tuple[str, Any, Any, dict[str, Any]]:
    """The labelled data ``fps train`` / ``fps eval`` read, as the model's task finds it (:mod:`.tasks`): ``data_dir``
    (a path, or data already discovered), or the data the file records, with the data options it records
    overridden by ``data_options``.

    Returns:
        ``(location, dataset, task, data options in effect)``.

    Raises:
        DataError: no data, data of another task's kind, no labels or a single class.
    """
    from .tasks import check_data, check_data_options, resolve_task

    spec = spec or spec_from_provenance(prov)
    task = resolve_task(spec)
    given = {k: v for k, v in (data_options or {}).items() if v is not None}
    check_data_options(task, given)
    options = {**(prov.get("data_options") or {}), **given}
    recorded = prov.get("data")
    if data_dir is not None or (recorded and Path(str(recorded)).exists()):
        check_data(task, spec, data_dir if data_dir is not None else str(recorded))
    folder = task.training_data(data_dir, prov, source, options)
    return folder.location, folder, task, options


def enable_grad_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing, non-reentrant (a block whose input needs no gradient, as behind a
    frozen embedding, still passes gradients to its own trainable entries).

    Raises:
        ModelError: the model has no gradient checkpointing (timm models, transformers models without it).
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ModelError(
            f"--grad-checkpointing: {type(model).__name__} does not support gradient checkpointing (transformers "
            "models that do say so in supports_gradient_checkpointing); train without it"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def freeze_norm_statistics(model: nn.Module) -> None:
    """Keep batch-norm running statistics as the base has them: the delta records weights, not buffers, so a
    statistic updated in training would be lost on merge."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


# ----------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    *,
    device: torch.device,
    precision: str = "fp32",
    num_classes: int,
    dist: Dist | None = None,
    task: Any = None,
) -> dict[str, Any]:
    """The task's metrics on ``batches`` (classification: top-1, and top-5 with at least 5 classes, in percent, and
    mean cross-entropy).

    Under torchrun each rank evaluates its shard and the sums are summed over ranks.

    Args:
        batches: dict batches of ``task`` (see :mod:`.tasks`).
        task: the task (default: image classification).
    """
    if task is None:
        from .tasks import IMAGE_CLASSIFICATION, get_task

        task = get_task(IMAGE_CLASSIFICATION)
    was_training = model.training
    model.eval()
    sums: dict[str, Tensor] = {}
    try:
        for batch in batches:
            batch = _to_device(batch, device)
            with autocast(device, precision):
                logits = task.forward(model, batch)
            for key, value in task.eval_sums(logits, batch).items():
                sums[key] = sums[key] + value.double() if key in sums else value.double()
    finally:
        model.train(was_training)
    keys = task.eval_keys  # the same on every rank, also one that had no batch
    values = [float(sums[k]) if k in sums else 0.0 for k in keys]
    if dist is not None and dist.enabled:
        values = sum_floats(values, device)
    return task.summarize(dict(zip(keys, values, strict=True)), num_classes)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    pin = device.type == "cuda"
    return {k: v.to(device, non_blocking=pin) if isinstance(v, Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------- checkpoint


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "loader": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any], generator: torch.Generator) -> None:
    import numpy as np

    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["loader"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def save_checkpoint(path: str | os.PathLike, state: Mapping[str, Any], *, tx: Transaction | None = None) -> None:
    """``torch.save`` through :mod:`.outputs` (temporary name, fsync, rename; the mode follows the umask): an
    interrupted write leaves the previous checkpoint intact. ``tx``: as part of a group commit."""

    def writer(tmp: Path) -> None:
        torch.save(dict(state), tmp)

    if tx is not None:
        tx.write(path, writer)
        return
    with Transaction(replace=True) as own:
        own.write(path, writer)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a training checkpoint (``weights_only=True``: a checkpoint is data, never code)."""
    path = Path(path)
    recover(path)  # a group write killed half-way in its folder reads as all old (outputs.py)
    if not path.is_file():
        raise TrainingError(f"no checkpoint {path} to resume from; run without --resume")
    try:
        state = torch_load_data(path)
    except Exception as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise TrainingError(f"cannot read checkpoint {path}: {reason}; start over with --force") from None
    if not isinstance(state, dict) or state.get("fps_checkpoint") != CHECKPOINT_VERSION:
        raise TrainingError(f"{path} is not an fps training checkpoint; start over with --force")
    problem = _checkpoint_problem(state)
    if problem is not None:
        raise TrainingError(f"{path} is not a valid fps training checkpoint: {problem}; start over with --force")
    return state


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _checkpoint_problem(state: Mapping[str, Any]) -> str | None:
    """What makes a (hand-edited) checkpoint unusable, before anything is restored from it."""
    config = state.get("config")
    if not isinstance(config, Mapping) or not _whole(config.get("epochs")):
        return "it records no training configuration"
    epoch = state.get("epoch")
    if not _whole(epoch) or epoch < 0:
        return f"its epoch is {epoch!r}, not a whole number"
    if epoch > config["epochs"]:
        return f"its epoch {epoch} is past the run's {config['epochs']} epochs"
    trainable = state.get("trainable")
    if not isinstance(trainable, Mapping) or not all(isinstance(t, Tensor) for t in trainable.values()):
        return "its trainable values are not a mapping of tensors"
    missing = [k for k in ("optimizer", "scheduler", "scaler", "rng") if not isinstance(state.get(k), Mapping)]
    if missing:
        return f"it lacks its {', '.join(missing)} state"
    history = state.get("history")
    if not isinstance(history, list) or not all(isinstance(h, Mapping) for h in history):
        return "its history is not a list of epoch records"
    if [h.get("epoch") for h in history] != list(range(1, epoch + 1)):
        return f"its history holds {len(history)} epoch{'' if len(history) == 1 else 's'}, not {epoch}"
    return None


def mask_digest(mask: Mask) -> str:
    """Identifies a selection: its indices and its fully trainable parameters."""
    import hashlib

    indices = weights_digest(sorted(mask.indices.items()))
    return hashlib.sha256(f"{indices}|{','.join(mask.fully_trainable)}".encode()).hexdigest()


# --------------------------------------------------------------------------------------------------- train


class RunFiles:
    """A training run's files as one unit: the checkpoint ``<out stem>.ckpt``, the JSON-lines metrics log
    ``<out stem>.metrics.jsonl`` (one event per line), timm's run records ``<out stem>.summary.csv`` (one row per
    epoch) and ``<out stem>.args.yaml`` (the resolved arguments; see :mod:`.records`) and, at the end, the delta.

    Nothing is written before the first checkpoint, so a run stopped before it leaves no file and can simply be
    rerun. Every checkpoint is committed together with the log and records of the events so far (one group commit,
    see :mod:`.outputs`), so they always describe the same epoch; the end commits the delta and the final log and
    records and removes the checkpoint, again as one group. A run that replaces an older unit (``--force``) leaves
    it whole until its own first checkpoint exists; the older delta stays until the new delta replaces it.

    Args:
        delta: the delta file; the checkpoint, log and records go beside it.
        force: the first commit may replace existing files (the run's own after that).
        args: the resolved arguments for ``args.yaml`` (``None``: no ``args.yaml``).
    """

    def __init__(self, delta: str | os.PathLike, *, force: bool = False, args: Mapping[str, Any] | None = None) -> None:
        self.delta = Path(delta)
        self.checkpoint = self.delta.with_suffix(".ckpt")
        self.log = self.delta.with_suffix(".metrics.jsonl")
        self.summary = self.delta.with_suffix(".summary.csv")
        self.args = self.delta.with_suffix(".args.yaml") if args is not None else None
        self._args_text = None if args is None else records.args_yaml(args)
        self.force = force
        self.records: list[str] = []
        self.rows: list[dict[str, Any]] = []
        self._owned = False  # the checkpoint, log and records are this run's after its first commit

    def set_args(self, args: Mapping[str, Any]) -> None:
        """The resolved arguments for ``args.yaml`` (known once the model and device are)."""
        self.args = self.delta.with_suffix(".args.yaml")
        self._args_text = records.args_yaml(args)

    def check_exists(self, *, resume: bool = False) -> None:
        """Refuse to replace the unit's files without ``force``; on ``resume`` the checkpoint and records are the
        run's own.

        Raises:
            OutputExistsError: a file of the unit exists, with the way out (``--force`` or ``--resume``).
        """
        if self.force:
            return
        if self.delta.exists():
            raise OutputExistsError(f"{self.delta} already exists; pass --force to replace it")
        if resume:
            self._read_log()  # a hand-edited log is refused before any work
            return
        if self.checkpoint.exists():
            raise OutputExistsError(
                f"{self.checkpoint} exists (an interrupted run?); pass --resume to continue it or --force to start over"
            )
        for record in (self.log, self.summary, self.args):
            if record is not None and record.exists():
                raise OutputExistsError(f"{record} already exists; pass --force to replace it")

    @property
    def files(self) -> list[Path]:
        """Every file of the unit but the delta."""
        return [self.checkpoint, self.log, self.summary, *([self.args] if self.args is not None else [])]

    def begin(self, resume_after: int | None = None) -> None:
        """Start the log; on resume keep the log's lines up to the checkpoint's epoch (the files are the run's own)
        and rebuild the summary's rows from the checkpoint's history: ``summary.csv`` is never read back."""
        self.records, self.rows = [], []
        if resume_after is not None:
            self._owned = True
            for line, record in self._read_log():
                if record.get("event") != "end" and record.get("epoch", 0) <= resume_after:
                    self.records.append(line)
            history = load_checkpoint(self.checkpoint)["history"]
            self.rows = [records.summary_row(e) for e in history if e["epoch"] <= resume_after]

    def _read_log(self) -> list[tuple[str, dict[str, Any]]]:
        """The metrics log's lines and records, for a resumed run.

        Raises:
            FileFormatError: the log is not UTF-8, or a line is not a JSON object with a whole-number epoch (named
                by its number; fps writes the log whole, so such a line was edited by hand).
        """
        if not self.log.is_file():
            return []
        data = self.log.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise FileFormatError(
                f"{self.log} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); fix or delete the "
                "file, or start over with --force"
            ) from None
        lines = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                problem = f"is not JSON ({e.msg}: column {e.colno})"
            else:
                if not isinstance(record, dict):
                    problem = f"is not a JSON object: {line if len(line) <= 60 else line[:57] + '...'}"
                elif "epoch" in record and not _whole(record["epoch"]):
                    problem = f'has "epoch": {json.dumps(record["epoch"])}, not a whole number'
                else:
                    lines.append((line, record))
                    continue
            raise FileFormatError(
                f"{self.log} line {n} {problem}; fix or delete that line (or the whole log: the resumed log then "
                "starts at the checkpoint), or start over with --force"
            )
        return lines

    def record(self, event: Event) -> None:
        self.records.append(json.dumps(event))
        if event.get("event") == "epoch":
            self.rows.append(records.summary_row(event))

    def _write_records(self, tx: Transaction, replace: bool) -> None:
        tx.write_bytes(self.log, "".join(f"{line}\n" for line in self.records).encode(), replace=replace)
        tx.write_bytes(self.summary, records.summary_csv(self.rows).encode(), replace=replace)
        if self.args is not None:
            tx.write_bytes(self.args, self._args_text.encode(), replace=replace)

    def save_checkpoint(self, state: Mapping[str, Any]) -> None:
        """Commit the checkpoint and the log and records so far, together."""
        replace = self._owned or self.force
        with Transaction(replace=replace) as tx:
            save_checkpoint(self.checkpoint, state, tx=tx)
            self._write_records(tx, replace)
        self._owned = True

    def finish(self, delta: Delta, end: Event) -> None:
        """Commit the delta and the final log and records, and remove the checkpoint, together."""
        from .formats import save_delta

        self.records.append(json.dumps(end))  # the metrics log only: the summary has a row per epoch
        with Transaction(replace=self.force) as tx:  # the delta: exclusive unless --force
            save_delta(self.delta, delta, tx=tx)
            self._write_records(tx, self._owned or self.force)
            tx.remove(self.checkpoint)


@dataclass
class RunInputs:
    """The model and data of a run, checked against the mask (:func:`build_run`).

    Attributes:
        spec: the base model as built.
        prov: the mask's provenance.
        source: how messages name the mask (its path, or "the mask").
        data_dir: the image folder.
        folder: its splits (``train``, and ``val`` when present).
        model: the base model, on the CPU, nothing attached yet.
        num_classes: the head's size.
        touched_sha256: digest of the base weights the mask selects from (a resumed run must share it).
        task: the model's task (:mod:`.tasks`): its data, batches, loss and metrics.
        data_options: the task's data options in effect (the mask's, overridden by the caller's).
    """

    spec: ModelSpec
    prov: Mapping[str, Any]
    source: str
    data_dir: Path
    folder: Any
    model: nn.Module
    num_classes: int
    touched_sha256: str
    task: Any = None
    data_options: dict[str, Any] = field(default_factory=dict)


@dataclass
class Loaders:
    """A run's data loaders (:func:`make_loaders`); ``sampler`` sets each epoch's order; ``task`` streams them."""

    train: torch.utils.data.DataLoader
    val: torch.utils.data.DataLoader | None
    sampler: DistributedSampler
    task: Any = None

    @property
    def notes(self) -> list[str]:
        """What the loaders report once (e.g. how many texts were truncated), training split first."""
        loaders = [("training", self.train), ("validation", self.val)]
        return [f"{split}: {n}" for split, loader in loaders if loader is not None for n in _notes(loader)]


def _notes(loader: torch.utils.data.DataLoader) -> list[str]:
    return list(getattr(loader.dataset, "notes", []))


def cpu_kernel_missing() -> str | None:
    """Why the sparse gradients on the CPU will run on torch's kernel, not fps's (:mod:`.sampled_product`), as one
    message, or ``None``. Builds the kernel now if this process has not yet (a tenth of a second), so that a run
    says it before its first step; the module's own warning is folded into this message."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        reason = sampled_product.unavailable_reason()
    if reason is None or reason == "FPS_SAMPLED_PRODUCT=torch":
        return None
    return (
        f"fps's CPU kernel for the sparse gradients is not available ({reason}); using torch's "
        "sparse_sampled_addmm: the same gradients, slower steps (install a C compiler, or set "
        "FPS_SAMPLED_PRODUCT=torch to choose torch's kernel without this warning)"
    )


@dataclass
class TrainState:
    """What one optimizer step changes (:func:`make_train_state`): the trainable values and the optimizer, its
    schedule and GradScaler, and where the run stands.

    Attributes:
        sparse: the trainable values attached to the model (see :mod:`.sparse`).
        steps_per_epoch: optimizer steps per epoch; ``total_steps``: of the whole run.
        step: optimizer steps taken so far; ``start_epoch``: the epoch a resumed run continues after.
        history: one record per completed epoch.
    """

    model: nn.Module
    sparse: SparseParams
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    criterion: nn.Module
    steps_per_epoch: int
    total_steps: int
    step: int = 0
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def build_run(
    mask: Mask,
    *,
    spec: ModelSpec | None = None,
    data_dir: str | os.PathLike | None = None,
    mask_path: str | os.PathLike | None = None,
    emit: Callable[[Event], None] = lambda event: None,
    data_options: Mapping[str, Any] | None = None,
) -> RunInputs:
    """Find the data (as the model's task reads it, with the mask's data options overridden by ``data_options``)
    and rebuild the base model the mask was made on, and check that they fit it.

    Raises:
        FileFormatError: the mask does not fit the model (every mismatch listed) or was made on other weights.
        DataError: the data folder does not fit the mask's classes.
    """
    source = str(mask_path) if mask_path is not None else "the mask"
    prov = mask.provenance
    spec = spec or spec_from_provenance(prov)
    data_dir, folder, task, options = training_data(data_dir, prov, source, spec, data_options)
    spec = replace(spec, task=task.name)
    classes = folder.train.classes
    if spec.num_classes is not None and task.classifies:  # fail before the model is built
        _check_classes(classes, spec.num_classes, folder.train.root, source)
    recorded_classes = prov.get("classes")
    if recorded_classes and len(recorded_classes) == len(classes) and list(recorded_classes) != classes:
        emit({"event": "warning", "message": f"class names of {folder.train.root} differ from the mask's"})

    model = build_base(spec, mask.shapes, prov, source)
    num_classes = _num_classes(model) or len(classes)
    if task.classifies:
        _check_classes(classes, num_classes, folder.train.root, source)
    base_params = dict(model.named_parameters())
    touched_sha256 = weights_digest((n, base_params[n]) for n in mask.indices)
    return RunInputs(spec, prov, source, data_dir, folder, model, num_classes, touched_sha256, task, options)


def make_loaders(
    run: RunInputs, config: TrainConfig, *, device: torch.device, num_workers: int | None = None, dist: Dist
) -> Loaders:
    """The task's training loader (images: timm's train transform, or the eval transform with ``augment`` off) over
    the train split, in an order that depends only on the seed and the epoch; its eval loader over the validation
    split, sharded over ranks."""
    folder, task = run.folder, run.task
    common = {"img_size": run.spec.img_size, "data_options": run.data_options}
    workers = default_num_workers(device) if num_workers is None else num_workers
    # Every world size, one included, takes an epoch's order from (seed, epoch): a resumed or a multi-process run
    # sees the same global batches as a plain one.
    sampler = DistributedSampler(
        range(len(folder.train.samples)), num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=config.seed
    )
    train_loader = task.loader(
        run.model,
        folder.train.samples,
        "train",
        augment=config.augment,
        batch_size=config.batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        sampler=sampler,
        seed=config.seed,
        **common,
    )
    val_loader = None
    if folder.val is not None:
        val_loader = task.loader(
            run.model,
            folder.val.samples,
            "eval",
            batch_size=config.batch_size,
            num_workers=workers,
            batches=batch_shard(len(folder.val.samples), config.batch_size, dist),
            **common,
        )
    return Loaders(train_loader, val_loader, sampler, task)


def make_train_state(
    model: nn.Module, mask: Mask, config: TrainConfig, *, device: torch.device, batches_per_epoch: int
) -> TrainState:
    """Attach the mask's trainable values to ``model`` (moved to ``device``) and build the optimizer, its per-step
    warmup + cosine schedule, the GradScaler (``fp16``) and the label-smoothed loss."""
    model.to(device)
    sparse = attach(model, mask.indices, mask.fully_trainable)
    optimizer = make_optimizer(sparse, config)
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    # Warmup takes at most half the run, so a short run (one epoch, warmup one epoch) still decays its rate.
    warmup_steps = min(round(config.warmup_epochs * steps_per_epoch), total_steps // 2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, total_steps=total_steps, warmup_steps=warmup_steps)
    )
    scaler = torch.amp.GradScaler(device.type, enabled=config.precision == "fp16")
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
    return TrainState(model, sparse, optimizer, scheduler, scaler, criterion, steps_per_epoch, total_steps)


def train_one_epoch(
    state: TrainState,
    loader: torch.utils.data.DataLoader,
    epoch: int,
    config: TrainConfig,
    *,
    device: torch.device,
    dist: Dist,
    log_every: int = 10,
    first_step: int = 1,
    checkpoint_path: str | os.PathLike | None = None,
    root: str | os.PathLike = "the data folder",
    emit: Callable[[Event], None] = lambda event: None,
    task: Any = None,
) -> dict[str, Any]:
    """One pass over ``loader`` (batches of ``task``, default image classification): forward under autocast,
    backward, gradients averaged over ranks, clipping, an optimizer and a schedule step every ``grad_accum`` batches.
    Emits ``progress`` every step and ``step`` every ``log_every`` steps, at the epoch's last step and at
    ``first_step``. ``checkpoint_path`` and ``root`` only name things in error messages.

    Returns:
        the epoch's record: ``train_loss``, ``train_top1`` (over every rank) and the ``lr`` of its last step.

    Raises:
        TrainingError: the loss became NaN or infinite (the message says what to do next).
        DataError: no image of the epoch could be read.
    """
    model, optimizer, scheduler, scaler = state.model, state.optimizer, state.scheduler, state.scaler
    model.train()
    freeze_norm_statistics(model)
    params = state.sparse.parameters()
    window_start, window_images = time.perf_counter(), 0
    lr = optimizer.param_groups[0]["lr"]  # the rate of the latest step (before the scheduler moves it on)
    # Running sums stay on the device and a non-finite loss is only noted there (first step, value): the loop
    # synchronises with the host at logging steps and at the end of the epoch, not at every step.
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.long, device=device)
    first_bad = torch.zeros((), dtype=torch.long, device=device)  # optimizer step of the first bad loss; 0: none
    bad_loss = torch.zeros((), dtype=torch.float32, device=device)
    seen = 0

    def check_finite() -> None:
        _check_finite(first_bad, bad_loss, epoch, checkpoint_path, state.start_epoch, state.history)

    from .tasks import examples_in

    task = task or _image_task()
    stream = task.stream(loader, False)
    micro = step_images = 0
    for batch in stream:
        batch = _to_device(batch, device)
        with recompute_sparse_weights(), autocast(device, config.precision):
            logits = task.forward(model, batch)
        loss = task.loss(logits, batch, state.criterion)
        n = task.count(batch)  # what the loss averages over: examples, or a language model's tokens
        examples = examples_in(batch)
        scaler.scale(loss / config.grad_accum).backward()
        detached = loss.detach()
        newly_bad = ~torch.isfinite(detached) & (first_bad == 0)
        first_bad = torch.where(newly_bad, state.step + 1, first_bad)
        bad_loss = torch.where(newly_bad, detached, bad_loss)
        loss_sum += detached.double() * n
        correct += task.hits(logits, batch)
        seen += n
        window_images += examples
        micro += 1
        step_images += examples
        if micro % config.grad_accum and micro != len(loader):
            continue
        if dist.enabled:
            average_gradients(params, dist.world_size)
        if config.clip_grad is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state.step += 1
        step = state.step
        # A cheap event every step (a progress bar: no host synchronisation), images counted over all ranks.
        emit(
            {
                "event": "progress",
                "step": step,
                "total_steps": state.total_steps,
                "images": step_images * dist.world_size,
            }
        )
        step_images = 0
        # A full step event every log_every steps, at the end of each epoch, and after the run's first step (a
        # large model can take minutes to get there: the log shows it has started).
        if step % log_every == 0 or micro == len(loader) or step == first_step:
            check_finite()
            elapsed = time.perf_counter() - window_start
            emit(
                {
                    "event": "step",
                    "epoch": epoch,
                    "step": step,
                    "total_steps": state.total_steps,
                    "loss": float(detached),
                    "lr": lr,
                    "images_per_s": window_images / elapsed if elapsed > 0 else None,
                }
            )
            window_start, window_images = time.perf_counter(), 0
    check_finite()
    loss_sum, correct = float(loss_sum), int(correct)
    if dist.enabled:
        loss_sum, correct, seen = sum_floats([loss_sum, correct, seen], device)
        correct, seen = int(correct), int(seen)
    if seen == 0:
        raise DataError(f"no readable images in {root}")
    return {
        "event": "epoch",
        "epoch": epoch,
        "step": state.step,
        "train_loss": loss_sum / seen,
        "train_top1": 100.0 * correct / seen,
        "lr": lr,  # the rate of the epoch's last step, as its step line logs it (timm's summary.csv lr)
    }


def validate(
    state: TrainState,
    loader: torch.utils.data.DataLoader,
    config: TrainConfig,
    *,
    device: torch.device,
    num_classes: int,
    dist: Dist,
    epoch: int,
    checkpoint_path: str | os.PathLike | None = None,
    task: Any = None,
) -> dict[str, Any]:
    """The task's metrics (top-1 / top-5 and loss) on the validation split, as ``val_*`` entries of the epoch's
    record.

    Raises:
        TrainingError: the validation loss is NaN or infinite.
    """
    task = task or _image_task()
    val = evaluate(
        state.model,
        task.stream(loader, False),
        device=device,
        precision=config.precision,
        num_classes=num_classes,
        dist=dist,
        task=task,
    )
    metrics = {f"val_{k}": v for k, v in val.items()}
    if "val_loss" in metrics and not math.isfinite(metrics["val_loss"]):
        raise TrainingError(
            _nan_message(
                metrics["val_loss"], epoch, state.step, checkpoint_path, state.start_epoch, state.history, "validation"
            )
        )
    return metrics


def checkpoint_state(
    state: TrainState, epoch: int, config: TrainConfig, mask: Mask, loader: torch.utils.data.DataLoader, run_id: dict
) -> dict[str, Any]:
    """Everything a resumed run needs to continue bit for bit after ``epoch`` (see :func:`restore_checkpoint`):
    the trainable values, the optimizer, schedule, scaler and random states, the history, and what identifies the
    run (``run_id``: the inputs a resume must share, see :func:`_run_identity`)."""
    return {
        "fps_checkpoint": CHECKPOINT_VERSION,
        "epoch": epoch,
        "config": asdict(config),
        "mask": mask_digest(mask),
        "trainable": {n: p.detach().cpu() for n, p in state.sparse.named_parameters()},
        "optimizer": state.optimizer.state_dict(),
        "scheduler": state.scheduler.state_dict(),
        "scaler": state.scaler.state_dict(),
        "rng": _rng_state(loader.generator),
        "history": state.history,
        "run": run_id,
    }


def restore_checkpoint(
    saved: Mapping[str, Any], state: TrainState, loader: torch.utils.data.DataLoader, config: TrainConfig
) -> None:
    """Continue ``state`` from a checkpoint: the trainable values, optimizer, schedule (at a new peak ``lr`` when it
    changed), scaler and random states, the epoch and the history.

    Raises:
        TrainingError: the checkpoint's states do not fit this run (a damaged or hand-made checkpoint).
    """
    try:
        state.start_epoch, state.history = _restore(
            saved, state.sparse, state.optimizer, state.scheduler, state.scaler, loader, config
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TrainingError(f"the training checkpoint cannot be restored ({reason}); start over with --force") from None
    state.step = state.start_epoch * state.steps_per_epoch


def run_train(
    mask: Mask,
    config: TrainConfig,
    *,
    spec: ModelSpec | None = None,
    data_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    num_workers: int | None = None,
    checkpoint_path: str | os.PathLike | None = None,
    resume: bool = False,
    mask_path: str | os.PathLike | None = None,
    log_every: int = 10,
    on_event: Callable[[Event], None] | None = None,
    dist: Dist | None = None,
    run: RunFiles | None = None,
    data_options: Mapping[str, Any] | None = None,
    grad_checkpointing: bool = False,
) -> TrainResult:
    """Fine-tune the entries ``mask`` selects (and its fully trainable tensors) on the images in ``data_dir``.

    The steps are timm's train.py's: :func:`build_run` (the model and data), :func:`make_loaders`,
    :func:`make_train_state` (optimizer, schedule), :func:`restore_checkpoint` on ``resume``, then per epoch
    :func:`train_one_epoch`, :func:`validate` and a checkpoint (:func:`checkpoint_state`).

    Under torchrun (``dist``) every rank trains on its share of each epoch with ``config.batch_size`` images per
    step, the gradients of the trainable tensors are averaged over ranks before each optimizer step, and
    validation is gathered over ranks; only rank 0 writes the checkpoint. The epoch's order depends only on the
    seed and the epoch, so one process with batch ``W * B`` steps through the same global batches as ``W`` ranks
    with batch ``B``.

    Args:
        mask: the selection; its provenance gives the defaults of ``spec`` and ``data_dir``.
        config: the training options.
        spec: the base model; default: as the mask records it (see :func:`spec_from_provenance`).
        data_dir: image folder with class sub-folders (or ``train/`` and ``val/`` splits); default: the mask's.
        device: where to train.
        num_workers: DataLoader workers (default: :func:`default_num_workers`).
        checkpoint_path: where to write a resumable checkpoint after every epoch (``None``: no checkpoints).
        resume: continue from ``checkpoint_path``.
        mask_path: recorded in the delta's provenance.
        log_every: emit a ``step`` event every this many optimizer steps (and at the end of every epoch).
        on_event: receives ``start``, ``progress`` (every optimizer step), ``step`` (every ``log_every`` steps, the
            first step and each epoch's last), ``epoch`` and ``warning`` events (plain dicts).
        dist: this process's rank under torchrun (default: a single process).
        run: the run's files (checkpoint and log committed together); replaces ``checkpoint_path``.
        data_options: the task's data options (text: ``max_length``, fields...), overriding the mask's.
        grad_checkpointing: recompute each transformer block's activations in the backward instead of keeping
            them (:func:`enable_grad_checkpointing`).

    Raises:
        FileFormatError: the mask does not fit the model (every mismatch listed) or was made on other weights.
        DataError: the data folder does not fit the mask's classes, or has an unreadable image.
        TrainingError: the loss became NaN or infinite, or the checkpoint belongs to another run.
    """
    dist = dist or Dist()
    emit = on_event or (lambda event: None)
    device = torch.device(device)
    if run is not None:
        checkpoint_path = run.checkpoint
    inputs = build_run(mask, spec=spec, data_dir=data_dir, mask_path=mask_path, emit=emit, data_options=data_options)
    if grad_checkpointing:
        enable_grad_checkpointing(inputs.model)
    spec, folder = inputs.spec, inputs.folder
    run_id = _run_identity(inputs.data_dir, spec, mask_path, inputs.touched_sha256, mask_digest(mask))

    saved = None
    if resume:
        if checkpoint_path is None:
            raise TrainingError("--resume needs a checkpoint path")
        saved = load_checkpoint(checkpoint_path)
        _check_same_run(saved, run_id, checkpoint_path)
        _check_resumable(saved, config, mask, checkpoint_path, emit)

    loaders = make_loaders(inputs, config, device=device, num_workers=num_workers, dist=dist)
    state = make_train_state(inputs.model, mask, config, device=device, batches_per_epoch=len(loaders.train))
    seed_everything(config.seed + dist.rank)  # each rank its own augmentation stream, as timm does
    if saved is not None:
        restore_checkpoint(saved, state, loaders.train, config)

    emit(
        {
            "event": "start",
            "epochs": config.epochs,
            "steps_per_epoch": state.steps_per_epoch,
            "train_samples": len(folder.train.samples),
            "val_samples": len(folder.val.samples) if folder.val is not None else 0,
            "trainable": state.sparse.numel,
            "total_params": mask.total_params,
            "resumed_from": state.start_epoch,
            "world_size": dist.world_size,
            **({"items": inputs.task.item_name[1]} if inputs.task.item_name[1] != "images" else {}),
        }
    )
    for note in loaders.notes:  # reported once per run, not per epoch
        emit({"event": "warning", "message": note})
    if device.type == "cpu" and any(d.sparse_path for d in state.sparse.deltas.values()):
        missing = cpu_kernel_missing()
        if missing:
            emit({"event": "warning", "message": missing})
    started = time.perf_counter()
    first_step = state.step + 1
    save = run.save_checkpoint if run is not None else partial(save_checkpoint, checkpoint_path)
    for epoch in range(state.start_epoch + 1, config.epochs + 1):
        loaders.sampler.set_epoch(epoch)
        epoch_start = time.perf_counter()
        record = train_one_epoch(
            state,
            loaders.train,
            epoch,
            config,
            device=device,
            dist=dist,
            log_every=log_every,
            first_step=first_step,
            checkpoint_path=checkpoint_path,
            root=folder.train.root,
            emit=emit,
            task=inputs.task,
        )
        if loaders.val is not None:
            record.update(
                validate(
                    state,
                    loaders.val,
                    config,
                    device=device,
                    num_classes=inputs.num_classes,
                    dist=dist,
                    epoch=epoch,
                    checkpoint_path=checkpoint_path,
                    task=inputs.task,
                )
            )
        record["seconds"] = time.perf_counter() - epoch_start
        state.history.append(record)
        emit(record)  # before the checkpoint, so that the log committed with it holds this epoch
        if checkpoint_path is not None and dist.is_main:
            save(checkpoint_state(state, epoch, config, mask, loaders.train, run_id))

    seconds = time.perf_counter() - started
    delta = _trained_delta(state, mask, config, inputs, mask_path)
    return TrainResult(
        delta,
        delta.provenance["metrics"],
        state.history,
        state.start_epoch,
        seconds,
        state.model,
        optimizer_state_numel(state.optimizer),
    )


def _trained_delta(
    state: TrainState, mask: Mask, config: TrainConfig, inputs: RunInputs, mask_path: str | os.PathLike | None
) -> Delta:
    """The trained change with its provenance: the base identity, checksums, configuration and final metrics."""
    prov, spec, folder = inputs.prov, inputs.spec, inputs.folder
    final = {k: v for k, v in state.history[-1].items() if k not in ("event", "seconds")}
    indices, values, full = extract(state.sparse)
    provenance = {
        **{k: prov.get(k) for k in IDENTITY_KEYS},
        "model": model_name(spec.name),
        "pretrained": bool(spec.pretrained and spec.checkpoint is None),
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "num_classes": inputs.num_classes,
        "img_size": spec.img_size,
        "base_sha256": prov.get("base_sha256"),
        "touched_sha256": inputs.touched_sha256,
        "mask": str(Path(mask_path).resolve()) if mask_path is not None else None,
        "mask_sha256": mask_digest(mask),
        "selection": {k: prov.get(k) for k in ("method", "norm", "granularity", "budget", "topk_per_neuron")},
        "data": folder.location,
        **folder.provenance(),
        **_task_record(inputs),
        "classes": folder.train.classes,
        "train_samples": len(folder.train.samples),
        "val_samples": len(folder.val.samples) if folder.val is not None else 0,
        "train_config": asdict(config),
        "metrics": final,
    }
    return Delta(indices, values, full, dict(mask.shapes), provenance)


def _task_record(inputs: RunInputs) -> dict[str, Any]:
    """The task and data options a delta records (image files keep their earlier form: the task only)."""
    from .tasks import IMAGE_CLASSIFICATION

    record: dict[str, Any] = {"task": inputs.task.name}
    if inputs.task.name != IMAGE_CLASSIFICATION or inputs.data_options:
        record["data_options"] = dict(inputs.data_options)
    return record


def _image_task() -> Any:
    from .tasks import IMAGE_CLASSIFICATION, get_task

    return get_task(IMAGE_CLASSIFICATION)


def _check_finite(
    first_bad: Tensor, bad_loss: Tensor, epoch: int, checkpoint_path: Any, start_epoch: int, history: list
) -> None:
    """Raise if a non-finite loss was noted (a host synchronisation: called at logging steps and epoch ends)."""
    if int(first_bad):
        raise TrainingError(_nan_message(float(bad_loss), epoch, int(first_bad), checkpoint_path, start_epoch, history))


def _nan_message(
    value: float,
    epoch: int,
    step: int,
    checkpoint_path: Any,
    start_epoch: int,
    history: list[dict[str, Any]],
    which: str = "",
) -> str:
    last = history[-1]["epoch"] if history else start_epoch
    if checkpoint_path is not None and last > 0:
        kept = f"the last good checkpoint {checkpoint_path} (epoch {last}) is kept: add --resume with a lower --lr"
    else:
        kept = "no epoch completed, so there is no checkpoint: rerun with a lower --lr"
    loss = f"{which} loss" if which else "loss"
    return f"{loss} is {value} at epoch {epoch}, step {step}; training stopped. {kept}, or set --clip-grad"


def _run_identity(
    data_dir: str | os.PathLike,
    spec: ModelSpec,
    mask_path: str | os.PathLike | None,
    touched_sha256: str,
    mask_sha256: str,
) -> dict[str, Any]:
    """What a resumed run must share with the checkpoint: the data folder, the mask (its content) and the base."""
    return {
        "data": str(data_dir),  # the data's location, as training_data gives it
        "mask": str(Path(mask_path).resolve()) if mask_path is not None else None,
        "mask_sha256": mask_sha256,
        "model": spec.name,
        "checkpoint": str(Path(spec.checkpoint).resolve()) if spec.checkpoint else None,
        "pretrained": bool(spec.pretrained),
        "touched_sha256": touched_sha256,
    }


def _check_same_run(state: Mapping[str, Any], now: Mapping[str, Any], path: Any) -> None:
    """Refuse to resume on another data folder, mask or base, naming what differs (all of it at once)."""
    saved = state.get("run")
    if not isinstance(saved, Mapping):
        return  # a checkpoint from before these were recorded
    flags = {"data": "--data", "model": "--model", "checkpoint": "--checkpoint"}
    differ = [f"{flags[k]} {saved.get(k)} -> {now[k]}" for k in flags if saved.get(k) != now[k]]
    if saved.get("mask_sha256") != now["mask_sha256"]:  # a copy of the same mask elsewhere is the same mask
        differ.insert(1, f"--mask {saved.get('mask')} -> {now['mask']}")
    if saved.get("pretrained") != now["pretrained"]:
        differ.append(f"--pretrained {saved.get('pretrained')} -> {now['pretrained']}")
    if not differ and saved.get("touched_sha256") != now["touched_sha256"]:
        differ.append("the base weights (same names, other values)")
    if differ:
        raise TrainingError(
            f"checkpoint {path} is from a run on other inputs ({'; '.join(differ)}); resume with the same inputs, "
            "or start over with --force"
        )


def _check_resumable(
    state: Mapping[str, Any], config: TrainConfig, mask: Mask, path: Any, emit: Callable[[Event], None]
) -> None:
    if state.get("mask") != mask_digest(mask):
        raise TrainingError(f"checkpoint {path} was made with another mask; start over with --force")
    saved = state.get("config", {})
    differ = [
        f"--{f.name.replace('_', '-')} {saved.get(f.name)!r} -> {getattr(config, f.name)!r}"
        for f in fields(TrainConfig)
        if f.name not in RESUME_MAY_CHANGE and saved.get(f.name) != getattr(config, f.name)
    ]
    if differ:
        raise TrainingError(
            f"checkpoint {path} is from a run with other options ({'; '.join(differ)}); resume with the same "
            "options, or start over with --force"
        )
    for name in RESUME_MAY_CHANGE:
        if saved.get(name) != getattr(config, name):
            emit({"event": "warning", "message": f"resuming with {name}={getattr(config, name)} (was {saved[name]})"})


def _restore(
    state: Mapping[str, Any],
    sparse: SparseParams,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    scaler: torch.amp.GradScaler,
    loader: torch.utils.data.DataLoader,
    config: TrainConfig,
) -> tuple[int, list[dict[str, Any]]]:
    trainable = state["trainable"]
    with torch.no_grad():
        for name, p in sparse.named_parameters():
            if name not in trainable or trainable[name].shape != p.shape:
                raise TrainingError(f"checkpoint lacks trainable tensor {name}; start over with --force")
            p.copy_(trainable[name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if state["config"]["lr"] != config.lr:  # a new peak lr, on the same schedule
        scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
        factor = scheduler.lr_lambdas[0](scheduler.last_epoch)
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = config.lr, config.lr * factor
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"], loader.generator)
    return int(state["epoch"]), list(state["history"])


# ---------------------------------------------------------------------------------------------- evaluation


def attach_delta(model: nn.Module, delta: Delta) -> SparseParams:
    """Attach a trained delta to a base model (on its device): the model then computes the fine-tuned outputs."""
    sparse = attach(model, delta.indices, list(delta.full), values=delta.values)
    with torch.no_grad():
        for name, value in delta.full.items():
            sparse.full[name].copy_(value)
    return sparse


def run_eval(
    delta: Delta,
    *,
    spec: ModelSpec | None = None,
    data_dir: str | os.PathLike | None = None,
    split: str = "val",
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 32,
    num_workers: int | None = None,
    delta_path: str | os.PathLike | None = None,
    data_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate a base model with ``delta`` attached on a split of ``data_dir``: ``val``, ``train``, ``test`` or
    any split the data names (``train800``, ``is_train=0``, ...), as the model's task reads it (``data_options``
    override the delta's).

    Raises:
        FileFormatError: the delta does not fit the model, or was trained on other base weights.
        DataError: the folder has no such split, or other classes.
    """
    device = torch.device(device)
    source = str(delta_path) if delta_path is not None else "the delta"
    bad = [n for n, t in [*delta.values.items(), *delta.full.items()] if not bool(torch.isfinite(t).all())]
    if bad:
        raise FileFormatError(f"{source} holds NaN or infinite values in {len(bad)} tensors ({', '.join(bad)})")
    prov = delta.provenance
    spec = spec or spec_from_provenance(prov)
    data_dir, folder, task, options = training_data(data_dir, prov, source, spec, data_options)
    spec = replace(spec, task=task.name)
    chosen = folder.split(split)
    model = build_base(spec, delta.shapes, prov, source)
    touched = weights_digest((n, dict(model.named_parameters())[n]) for n in delta.indices)
    if prov.get("touched_sha256") and touched != prov["touched_sha256"]:
        raise FileFormatError(f"{source} was trained on other base weights than {spec.name} as loaded now")
    num_classes = _num_classes(model) or len(folder.train.classes)
    if task.classifies:
        _check_classes(folder.train.classes, num_classes, folder.train.root, source)
    model.to(device)
    attach_delta(model, delta)
    workers = default_num_workers(device) if num_workers is None else num_workers
    loader = task.loader(
        model,
        chosen.samples,
        "eval",
        img_size=spec.img_size,
        data_options=options,
        batch_size=batch_size,
        num_workers=workers,
    )
    metrics = evaluate(
        model, task.stream(loader, False), device=device, precision=precision, num_classes=num_classes, task=task
    )
    notes = _notes(loader)
    return {"split": split, "data": folder.location, **metrics, **({"notes": notes} if notes else {})}
