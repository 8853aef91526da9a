"""``fps select`` as a library call: model + data -> input statistics -> scores -> a budgeted mask.

The pieces are the ones a reader would look for by name: :mod:`.candidates` says what may be selected,
:mod:`.activations` gathers the statistics (:mod:`.gradients` the summed gradients of the GPS baseline),
:mod:`.scoring` turns them into scores, :mod:`.selection` takes the top-k, :mod:`.formats` writes the files. This
module wires them and keeps the budget arithmetic. Every method, fresh or from a score file, goes through
:func:`~fps_cli.scoring.make_scores` and :func:`build_mask`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .activations import InputStats, autocast, input_stats_hooks, real_token_inputs
from .candidates import ParameterRoles, baseline_trainable, find_head
from .constants import BASELINE_METHODS, DEFAULT_BUDGET
from .data import default_num_workers, subsample
from .distributed import Dist, all_reduce, batch_shard, reduce_input_stats, sum_over_ranks
from .errors import BudgetError, DataError, FileFormatError
from .formats import (
    Mask,
    read_gradient_scores,
    read_scores,
    save_gradient_scores,
    save_scores,
    score_statistic,
    weights_digest,
)
from .models import ModelSpec, create_model, model_name, model_num_classes
from .options import SelectOptions as SelectOptions  # re-exported: the selection options live in options.py
from .scoring import make_scores
from .selection import select, select_topk_per_neuron

if TYPE_CHECKING:
    from .outputs import Transaction


@dataclass
class SelectResult:
    """What a selection produced.

    Attributes:
        mask: the selection, with provenance.
        stats: per-layer input statistics (the score file's content for activation-based methods).
        gradients: per-layer summed gradients (the score file's content for ``gps``).
        score_provenance: the provenance to write into the score file.
        pass_seconds: wall time of the statistics pass (0 when re-selecting from scores).
        skipped_images: unreadable images skipped with ``skip_bad``.
        notes: what the data loading reports once (e.g. how many texts were truncated).
    """

    mask: Mask
    stats: dict[str, InputStats] | None
    score_provenance: dict[str, Any] = field(default_factory=dict)
    pass_seconds: float = 0.0
    skipped_images: list[Path] = field(default_factory=list)
    gradients: dict[str, Tensor] | None = None
    notes: list[str] = field(default_factory=list)


def write_scores(
    path: str | Path, result: SelectResult, *, tx: Transaction | None = None, overwrite: bool = False
) -> None:
    """Write the score file of a fresh selection: input statistics, or summed gradients for ``gps``
    (``tx``: as part of a group commit, see :func:`.formats.write_atomic`; an existing file only with
    ``overwrite=True``)."""
    if result.gradients is not None:
        save_gradient_scores(path, result.gradients, result.score_provenance, tx=tx, overwrite=overwrite)
    elif result.stats is not None:
        save_scores(path, result.stats, result.score_provenance, tx=tx, overwrite=overwrite)
    else:
        raise ValueError("a re-selection has no new scores to write")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (model initialisation, sampling, ties of the ``random`` method)."""
    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` is CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ValueError(f"unknown device {device!r}; expected auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        from .errors import FpsError

        raise FpsError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return resolved


def selection_count(roles: ParameterRoles, budget: float) -> int:
    """How many candidate entries a budget selects: ``round(budget * total) - fully trainable``, exactly.

    Raises:
        BudgetError: the fully trainable parts alone exceed the budget, or the candidates cannot fill it.
    """
    total = roles.total_params
    fixed = roles.fully_trainable_params
    target = round(budget * total)
    n = target - fixed
    if n < 0:
        minimum = math.ceil(fixed / total * 10_000) / 10_000
        default = (
            f"the default budget {budget:g} is sized for ViT-B/16 (86 M parameters); on a {total:,}-parameter model "
            "the head and biases are a larger share. "
            if budget == DEFAULT_BUDGET
            else ""
        )
        raise BudgetError(
            f"{default}budget {budget:g} leaves no room: the head and biases already take {fixed / total:.2%} of "
            f"parameters ({fixed:,} of {total:,}); use --no-train-bias or a budget of at least {minimum:g}"
        )
    if n > roles.candidate_params:
        maximum = (roles.candidate_params + fixed) / total
        raise BudgetError(
            f"budget {budget:g} asks for {n:,} selected entries but the candidate layers hold only "
            f"{roles.candidate_params:,}; use a budget of at most {maximum:.4f}"
        )
    return n


def build_mask(roles: ParameterRoles, scores: Mapping[str, Tensor], options: SelectOptions) -> Mask:
    """Select from ``scores`` under ``options`` (pure: no I/O, no model run)."""
    if options.topk_per_neuron is not None:
        indices = select_topk_per_neuron(scores, options.topk_per_neuron)
    else:
        indices = select(scores, selection_count(roles, options.budget), options.granularity)
    return Mask(indices, list(roles.fully_trainable), dict(roles.shapes))


def _mask_from(
    roles: ParameterRoles,
    options: SelectOptions,
    stats: Mapping[str, InputStats] | None,
    gradients: Mapping[str, Tensor] | None,
    anchor: Mapping[str, InputStats] | None,
) -> Mask:
    """Score with ``options.method`` and select: the one path every method and every entry point takes."""
    scores = make_scores(
        options.method,
        roles.candidates,
        stats=stats,
        gradients=gradients,
        norm=options.norm,
        seed=options.seed,
        anchor=anchor,
    )
    return build_mask(roles, scores, options)


def base_digest(model: nn.Module) -> str:
    """Digest of every parameter but the (new) head: identifies the pretrained weights a file was made from."""
    head_ids = {id(p) for h in find_head(model) for p in h.parameters()}
    return weights_digest((n, p) for n, p in model.named_parameters() if id(p) not in head_ids)


def _model_provenance(
    spec: ModelSpec, model: nn.Module, num_classes: int | None, img_size: int | None, init_seed: int
) -> dict[str, Any]:
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return {
        "model": model_name(spec.name),
        "pretrained": bool(spec.pretrained and spec.checkpoint is None),
        "pretrained_tag": cfg.get("tag") if spec.pretrained and spec.checkpoint is None else None,
        "checkpoint": str(spec.checkpoint) if spec.checkpoint else None,
        "num_classes": num_classes,
        "img_size": img_size,
        "init_seed": init_seed,
        "base_sha256": base_digest(model),
    }


def _selection_provenance(
    options: SelectOptions, anchor: str | Path | None = None, gps: tuple[str, bool] | None = None
) -> dict[str, Any]:
    """``gps``: the GPS loss and augmentation the scores were made with (default: ``options``')."""
    extra: dict[str, Any] = {}
    if options.method == "gps":
        loss, augment = gps or (options.loss, options.augment)
        extra = {"gps_loss": loss, "augment": augment}
    if anchor is not None:
        extra["anchor"] = str(Path(anchor).resolve())
    return {
        **extra,
        "method": options.method,
        "norm": options.norm,
        "granularity": options.granularity if options.topk_per_neuron is None else "neuron",
        "budget": options.budget if options.topk_per_neuron is None else None,
        "topk_per_neuron": options.topk_per_neuron,
        "train_bias": options.train_bias,
        "seed": options.seed,
    }


def run_select(
    spec: ModelSpec,
    data_dir: str | Path,
    options: SelectOptions,
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    batch_size: int = 32,
    num_workers: int | None = None,
    max_samples: int | None = None,
    skip_bad_images: bool = False,
    anchor: str | Path | None = None,
    on_start: Callable[[int], None] | None = None,
    on_batch: Callable[[int], None] | None = None,
    dist: Dist | None = None,
    data_options: Mapping[str, Any] | None = None,
) -> SelectResult:
    """Select parameters of ``spec``'s model on the examples in ``data_dir``.

    The model's task (:func:`fps_cli.tasks.resolve_task`: ``spec.task``, or what the model's config says) builds
    the model, finds and loads the data and runs a batch; the statistics, scores and selection are the task-free
    core's.

    Args:
        spec: the model; ``num_classes`` defaults to the number of classes in the data.
        data_dir: the task's data: an image folder (class sub-folders, ``train/`` split, or flat); for text, JSON
            Lines / CSV files or class folders of ``.txt`` files.
        options: method, budget, granularity, ...
        device: where the model runs.
        precision: autocast precision of the forward pass (statistics stay fp32).
        batch_size: examples per forward pass.
        num_workers: DataLoader workers (default: :func:`default_num_workers`).
        max_samples: a seeded random subset of at most this many examples.
        skip_bad_images: skip unreadable images instead of failing.
        anchor: a score file of input statistics of the same model on other data (experimental, ``fps`` and
            ``activation``): the activation statistic becomes its growth ``a_task / (a_anchor + eps)``.
        on_start: called with the number of examples before the pass.
        on_batch: called with each batch's size during the pass.
        dist: this process's rank under torchrun: it reads every ``world_size``-th batch, and the statistics
            are summed over ranks before selection (default: a single process).
        data_options: the task's own data options (text: ``text_field``, ``label_field``, ``text_pair_field``,
            ``max_length``, ``val_split``); recorded in the mask, so ``fps train`` reads the data the same way.
    """
    _check_method(options, anchor)
    dist = dist or Dist()
    device = torch.device(device)
    from .tasks import dataset_of

    task, spec, data_options = _task_inputs(spec, data_dir, data_options)
    found = dataset_of(task, data_dir, data_options)
    task.check_select(found)  # e.g. one class, or a dataset's image folder: refused before the model is built
    split = found.train
    if options.method == "gps" and task.classifies and not split.labeled:
        raise DataError(
            f"--method gps needs labels, but {split.root} is a flat folder of unlabeled images; put the images in "
            "class sub-folders (DIR/<class>/...), or use --method fps, which does not need labels"
        )
    num_classes = spec.num_classes if spec.num_classes is not None else (len(split.classes) or None)
    if spec.num_classes is None and num_classes is not None:
        spec = replace(spec, num_classes=num_classes)
    samples = subsample(split.samples, max_samples, options.seed)

    seed_everything(options.seed)
    model = create_model(spec)
    if task.classifies:
        num_classes = num_classes if num_classes is not None else model_num_classes(model)
    from .tasks import task_roles

    roles = task_roles(task, model, options.train_bias)
    if options.topk_per_neuron is None:
        selection_count(roles, options.budget)  # fail on an impossible budget before the data pass
    anchor_stats = load_anchor(anchor, roles, spec.name, options.method) if anchor is not None else None

    gps = options.method == "gps"
    workers = default_num_workers(device) if num_workers is None else num_workers
    loader = task.loader(
        model,
        samples,
        "gps" if gps else "select",
        img_size=spec.img_size,
        augment=options.augment,
        data_options=data_options,
        batch_size=batch_size,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        batches=batch_shard(len(samples), batch_size, dist),
    )
    notes = list(getattr(loader.dataset, "notes", []))
    stream = task.stream(loader, skip_bad_images)
    model.to(device)
    if on_start is not None:
        on_start(len(samples))
    start = time.perf_counter()
    stats = gradients = None
    if gps:
        from .gradients import collect_gradients

        weights = {name: module.weight for name, module in roles.candidates.items()}
        gradients = collect_gradients(
            model,
            weights,
            stream,
            loss=options.loss,
            device=device,
            precision=precision,
            on_batch=on_batch,
            reduce=all_reduce if dist.enabled else None,
            batch_loss=task.gps_loss,
        )
    else:
        stats = gather_input_stats(
            model,
            roles.candidates,
            stream,
            forward=task.statistics_forward or task.forward,
            real_tokens=task.real_tokens,
            device=device,
            precision=precision,
            on_batch=on_batch,
        )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    seen, skipped = stream.seen, len(stream.skipped)
    if dist.enabled:
        if stats is not None:
            reduce_input_stats(stats, device)
        seen, skipped = sum_over_ranks([seen, skipped], device)
    if seen == 0:
        raise DataError(f"no readable images in {split.root} ({skipped} skipped)")

    data_provenance = {
        "data": found.location,
        **found.provenance(),
        "num_samples": seen,
        "skipped_images": skipped,
        "classes": split.classes,
        "precision": precision,
        **_task_provenance(task, data_options),
    }
    augment = options.augment and task.gps_augments
    if gps:
        data_provenance.update(gps_loss=options.loss, augment=augment, batch_size=batch_size)
    score_provenance = {**_model_provenance(spec, model, num_classes, spec.img_size, options.seed), **data_provenance}
    mask = _mask_from(roles, options, stats, gradients, anchor_stats)
    mask.provenance = {**score_provenance, **_selection_provenance(options, anchor, (options.loss, augment))}
    return SelectResult(
        mask,
        {k: _to_cpu(v) for k, v in stats.items()} if stats is not None else None,
        score_provenance,
        seconds,
        stream.skipped,
        {k: v.cpu() for k, v in gradients.items()} if gradients is not None else None,
        notes,
    )


def _task_inputs(
    spec: ModelSpec, data_dir: str | Path, data_options: Mapping[str, Any] | None
) -> tuple[Any, ModelSpec, dict[str, Any]]:
    """The model's task, the spec with that task set, and the data options given (checked against the task and
    the data's kind before the model is built)."""
    from .tasks import check_data, check_data_options, resolve_task

    task = resolve_task(spec)  # the data was listed (and refused) before any model is built
    data_options = {k: v for k, v in (data_options or {}).items() if v is not None}
    check_data_options(task, data_options)
    check_data(task, spec, data_dir)
    return task, replace(spec, task=task.name), data_options


def _task_provenance(task: Any, data_options: Mapping[str, Any]) -> dict[str, Any]:
    """What a file records about its task: the task's name and, when given or for tasks other than image
    classification (whose files otherwise keep their earlier form), the data options."""
    from .tasks import IMAGE_CLASSIFICATION

    if task.name == IMAGE_CLASSIFICATION and not data_options:
        return {"task": task.name}
    return {"task": task.name, "data_options": dict(data_options)}


def gather_input_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Mapping[str, Any]],
    *,
    forward: Callable[[nn.Module, Mapping[str, Any]], Any],
    real_tokens: Callable[[Mapping[str, Any]], Tensor | None],
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, InputStats]:
    """Run ``forward(model, batch)`` over dict batches once, with no gradients, and return every module's input
    statistics (:func:`fps_cli.activations.input_stats_hooks`).

    ``real_tokens(batch)`` (``[batch, seq]`` bool, or ``None`` for all) says which positions count: a layer input
    ``[batch, seq, ...]`` that lines up with it is reduced to its real tokens, so padding never counts; an input
    that does not (e.g. a pooler's ``[batch, dim]``, one vector per sequence) counts whole.
    """
    from .tasks import examples_in  # the batch convention (import-light: no task module is loaded)

    device = torch.device(device)
    keep: list[Tensor | None] = [None]

    def select_tokens(name: str, x: Tensor) -> Tensor:
        real = real_token_inputs(x, keep[0])
        return x if real is None else real  # an input that does not line up with the tokens counts whole

    was_training = model.training
    model.eval()
    try:
        with input_stats_hooks(modules, select_tokens) as stats, torch.inference_mode(), autocast(device, precision):
            for batch in batches:
                batch = {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}
                keep[0] = real_tokens(batch)
                forward(model, batch)
                if on_batch is not None:  # examples (a packed batch records how many it holds), not rows
                    on_batch(examples_in(batch))
    finally:
        model.train(was_training)
    return stats


def _check_method(options: SelectOptions, anchor: str | Path | None) -> None:
    """A selection needs scores (not a baseline), and an anchor only fits a method with an activation statistic."""
    if options.baseline:
        raise ValueError(f"--method {options.method} has a fixed trainable set: use run_baseline, not a selection")
    if anchor is not None:
        replace(options, anchor=True)  # raises OptionsError, with the command line's text, when it does not fit


def run_baseline(
    spec: ModelSpec,
    data_dir: str | Path,
    method: str,
    *,
    seed: int = 0,
    data_options: Mapping[str, Any] | None = None,
) -> SelectResult:
    """The mask of a baseline with a fixed trainable set: ``full``, ``linear`` (head only) or ``bias`` (BitFit).

    No image is read and no budget applies (the provenance says ``budget: null, budget_ignored: true``); the data
    folder, its classes and the class count are still recorded, so ``fps train --mask`` needs no other flag.

    Args:
        spec: the model; ``num_classes`` defaults to the number of class folders.
        data_dir: the task's data (only its classes are listed).
        method: one of :data:`~fps_cli.constants.BASELINE_METHODS`.
        seed: initialisation seed of the model (and of its new head).
        data_options: the task's own data options (see :func:`run_select`), recorded for ``fps train``.
    """
    if method not in BASELINE_METHODS:
        raise ValueError(f"unknown baseline {method!r}; expected one of {BASELINE_METHODS}")
    from .tasks import dataset_of

    task, spec, data_options = _task_inputs(spec, data_dir, data_options)
    found = dataset_of(task, data_dir, data_options)
    task.check_select(found)
    split = found.train
    num_classes = spec.num_classes if spec.num_classes is not None else (len(split.classes) or None)
    if spec.num_classes is None and num_classes is not None:
        spec = replace(spec, num_classes=num_classes)
    seed_everything(seed)
    model = create_model(spec)
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    mask = Mask({}, baseline_trainable(model, method), shapes)
    mask.provenance = {
        **_model_provenance(spec, model, num_classes, spec.img_size, seed),
        "data": found.location,
        **found.provenance(),
        "num_samples": 0,  # no data pass
        "skipped_images": 0,
        "classes": split.classes,
        **_task_provenance(task, data_options),
        "method": method,
        "norm": None,
        "granularity": None,
        "budget": None,
        "budget_ignored": True,
        "topk_per_neuron": None,
        "train_bias": method != "linear",
        "seed": seed,
    }
    return SelectResult(mask, None, {})


def _to_cpu(s: InputStats) -> InputStats:
    return InputStats(s.abs_sum.cpu(), s.sq_sum.cpu(), s.count)


def _stats_problems(stats: Mapping[str, InputStats], roles: ParameterRoles) -> list[str]:
    """Every way a set of input statistics does not fit the candidate layers (missing, extra, mis-shaped)."""
    problems = [f"no statistics for layer {n}" for n in roles.candidates if n not in stats]
    problems += [
        f"statistics for {n}, which is not a candidate layer of the model" for n in stats if n not in roles.candidates
    ]
    problems += [
        f"{n}: statistics {list(stats[n].abs_sum.shape)} do not fit the layer"
        for n in roles.candidates
        if n in stats and stats[n].abs_sum.numel() != _stat_numel(roles.candidates[n])
    ]
    return problems


def _gradient_problems(gradients: Mapping[str, Tensor], roles: ParameterRoles) -> list[str]:
    """Every way a set of summed gradients does not fit the candidate weights."""
    problems = [f"no gradient for weight {n}" for n in roles.candidates if n not in gradients]
    problems += [
        f"gradient for {n}, which is not a candidate weight of the model"
        for n in gradients
        if n not in roles.candidates
    ]
    problems += [
        f"{n}: gradient {list(gradients[n].shape)} vs weight {list(roles.shapes[n])}"
        for n in roles.candidates
        if n in gradients and tuple(gradients[n].shape) != tuple(roles.shapes[n])
    ]
    return problems


def load_anchor(path: str | Path, roles: ParameterRoles, model_name: str, method: str = "fps") -> dict[str, InputStats]:
    """Read an anchor score file (experimental ``--anchor``) and check that it fits the model's layers.

    Raises:
        FileFormatError: the file is not a score file of input statistics, or its layers or shapes differ.
        ValueError: ``method`` has no activation statistic to anchor.
    """
    if method not in ("fps", "activation"):
        raise ValueError(f"--anchor scales the activation statistic of fps and activation, not of {method}")
    if score_statistic(path) != "input":
        raise FileFormatError(
            f"anchor {path} holds gradients (a gps score file); --anchor needs the input statistics of an fps "
            "score file"
        )
    stats, _ = read_scores(path)
    problems = _stats_problems(stats, roles)
    if problems:
        raise FileFormatError(f"anchor {path} does not fit {model_name}:\n  " + "\n  ".join(problems))
    return stats


def reselect(
    scores_path: str | Path,
    options: SelectOptions,
    *,
    spec: ModelSpec | None = None,
    device: torch.device | str = "cpu",
    anchor: str | Path | None = None,
    trust_remote_code: bool = False,
) -> SelectResult:
    """Re-select from a saved score file at new options, with no data pass.

    The model is rebuilt as the score file records it (or as ``spec`` overrides), and must have the same
    weights the scores were gathered on. A file of input statistics serves ``fps``, ``activation``, ``weight``
    and ``random``; a file of summed gradients serves ``gps`` (and ``weight`` / ``random``, which need no data).

    Args:
        scores_path: the score file.
        options: method, budget, granularity, ...
        spec: overrides the model the file records.
        device: where the scores are computed.
        anchor: an anchor score file (experimental; see :func:`run_select`).
        trust_remote_code: let the recorded ``hf:`` model run code from its repository (never read from the file).
    """
    _check_method(options, anchor)
    statistic = score_statistic(scores_path)
    if statistic == "gradient" and options.method in ("fps", "activation"):
        raise FileFormatError(
            f"{scores_path} holds GPS gradients, not the input statistics --method {options.method} needs; "
            "re-select it with --method gps, or run a new selection"
        )
    if statistic == "input" and options.method == "gps":
        raise FileFormatError(
            f"{scores_path} holds input statistics, not the gradients --method gps needs; run "
            "fps select --method gps to make a gps score file"
        )
    stats: dict[str, InputStats] | None = None
    gradients: dict[str, Tensor] | None = None
    gps = None
    if statistic == "gradient":
        gradients, prov = read_gradient_scores(scores_path)
    else:
        stats, prov = read_scores(scores_path)
    try:
        recorded = ModelSpec(
            name=prov["model"],
            pretrained=bool(prov["pretrained"]),
            checkpoint=Path(prov["checkpoint"]) if prov.get("checkpoint") else None,
            num_classes=prov["num_classes"],
            img_size=prov.get("img_size"),
            trust_remote_code=trust_remote_code,
            task=prov.get("task"),
        )
    except (KeyError, TypeError):
        raise FileFormatError(f"{scores_path}: score header lacks the model provenance") from None
    spec = spec or recorded
    # A randomly initialised model is rebuilt from the seed it was built with, so its weights match.
    init_seed = int(prov.get("init_seed", 0))
    seed_everything(init_seed)
    model = create_model(spec).to(device)
    from .tasks import resolve_task, task_roles

    roles = task_roles(resolve_task(spec), model, options.train_bias)

    digest = base_digest(model)
    if prov.get("base_sha256") and digest != prov["base_sha256"]:
        raise FileFormatError(
            f"{scores_path} was computed on other weights than {spec.name} as loaded now "
            f"(base checksum {prov['base_sha256'][:12]}… vs {digest[:12]}…); pass the same --model / --checkpoint"
        )
    problems = _gradient_problems(gradients, roles) if gradients is not None else _stats_problems(stats, roles)
    if problems:
        raise FileFormatError(f"{scores_path} does not fit {spec.name}:\n  " + "\n  ".join(problems))
    anchor_stats = load_anchor(anchor, roles, spec.name, options.method) if anchor is not None else None

    if stats is not None:
        stats = {n: InputStats(s.abs_sum.to(device), s.sq_sum.to(device), s.count) for n, s in stats.items()}
    if gradients is not None:
        gradients = {n: g.to(device) for n, g in gradients.items()}
        # The GPS settings a gradient file was made with are part of its scores; a new mask keeps them.
        gps = (prov.get("gps_loss", options.loss), prov.get("augment", options.augment))
    mask = _mask_from(roles, options, stats, gradients, anchor_stats)
    score_keys = ("data", "num_samples", "skipped_images", "classes", "precision", "task", "data_options")
    mask.provenance = {
        **_model_provenance(spec, model, recorded.num_classes, spec.img_size, init_seed),
        **{k: prov.get(k) for k in score_keys if k in prov or k not in ("task", "data_options")},
        **_selection_provenance(options, anchor, gps),
        "from_scores": str(Path(scores_path).resolve()),
    }
    return SelectResult(mask, None, prov)


def _stat_numel(module: nn.Module) -> int:
    from .activations import stats_shape

    return math.prod(stats_shape(module))
