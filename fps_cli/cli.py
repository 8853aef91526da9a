"""The ``fps`` command line: parses, validates and wires library calls; no tensor math, no batch loop.

Results go to stdout (a human summary, or exactly one JSON object with ``--json``); logs and progress go to
stderr, progress bars only when stderr is a terminal. Exit codes: 0 success, 1 a failure the user can fix
(an :class:`~fps_cli.errors.FpsError`), 2 a usage error, 130 interrupted. Heavy imports (torch, timm) happen
inside the commands so that ``fps --help`` stays fast.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .constants import (
    DATASET_FORMATS,
    DEFAULT_BUDGET,
    GPS_LOSSES,
    GRANULARITIES,
    LARGE_BUDGET,
    NORMS,
    PRECISIONS,
    SELECT_METHODS,
)


class _Group(TyperGroup):
    """The root command: its help shows no ``<bool>`` after ``--version`` and ``--help``."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # a flag takes no value
        return params


app = typer.Typer(
    name="fps",
    cls=_Group,
    help="Select the few weights of a pretrained vision model worth fine-tuning, in one forward pass.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class _Command(TyperCommand):
    """A typer command whose help shows no ``<bool>`` after a flag and no ``<list[Path]>`` after ``FILE``, and
    whose own parse errors (an unknown option, a value of the wrong type) are one JSON object on stdout too under
    ``--json``."""

    def parse_args(self, ctx, args):
        json_requested = "--json" in args
        try:
            return super().parse_args(ctx, args)
        except typer.TyperException as e:  # typer's (vendored) click UsageError and its subclasses: exit code 2
            if json_requested and getattr(e, "exit_code", None) == 2:
                _json_error(e.format_message(), 2)
            raise

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""  # a flag takes no value
            elif param.param_type_name == "argument":
                param.metavar = param.metavar or "FILE"
                param.display_type_rich = lambda ctx: None  # the name says it; typer would add <list[Path]>
        return params


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fps_cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """fps: Feedforward-based Parameter Selection for cheap fine-tuning of vision models."""


class Reporter:
    """Where a command's words go: logs and progress to stderr (unless quiet), the result to stdout."""

    def __init__(self, *, quiet: bool, as_json: bool) -> None:
        self.quiet, self.as_json = quiet, as_json

    def log(self, message: str) -> None:
        if not self.quiet:
            typer.echo(message, err=True)

    def result(self, payload: dict[str, Any], human: str) -> None:
        typer.echo(json.dumps(payload) if self.as_json else human)

    @contextlib.contextmanager
    def progress(
        self, description: str, *, lines: bool = False, preparing: str | None = None, unit: str = "images"
    ) -> Iterator[tuple[Callable[[int], None], Callable[[int], None]]]:
        """Yields ``(on_start(total), on_advance(n))`` callbacks driving a rich bar on an interactive stderr.

        The bar counts ``unit`` (images, texts, examples) and shows them per second and the time left, both from the
        mean rate since
        ``on_start``, so they appear after the first batch (rich's own estimate waits for several updates). Before
        ``on_start`` the bar shows ``preparing`` (``building the model``) as a step of its own. Off a terminal (CI
        logs, SLURM) and with ``lines``, a line is logged at every tenth of the total instead, with the same rate
        and time left.
        """
        if self.quiet:
            yield (lambda total: None), (lambda n: None)
            return
        if not sys.stderr.isatty():
            if not lines:
                yield (lambda total: None), (lambda n: None)
                return
            yield _ProgressLines(description, self.log, unit).callbacks()
            return
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
        from rich.text import Text

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                if task.total is None:
                    return Text("")
                elapsed = task.elapsed or 0.0
                if not task.completed or elapsed <= 0:
                    return Text(f"- {_per_second(unit)}, ETA -:--:--")
                rate = task.completed / elapsed
                left = max((task.total or task.completed) - task.completed, 0) / rate
                return Text(f"{rate:,.1f} {_per_second(unit)}, ETA {_clock(left)}")

        class CountColumn(MofNCompleteColumn):
            def render(self, task: Any) -> Text:
                return super().render(task) if task.total is not None else Text("")

        columns = (TextColumn("{task.description}"), BarColumn(), CountColumn(), RateColumn())
        with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
            task = bar.add_task(preparing or description, total=None)

            def on_start(total: int) -> None:
                bar.reset(task, total=total, description=description)

            yield on_start, (lambda n: bar.advance(task, n))


def _per_second(unit: str) -> str:
    """``img/s`` for images (as timm logs them), ``texts/s``, ``examples/s``."""
    return "img/s" if unit == "images" else f"{unit}/s"


def _clock(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


class _ProgressLines:
    """Progress as log lines (no terminal): ``scoring: 320/3,200 images (10%), 45.2 img/s, ETA 0:01:04``, at
    every tenth of the total, like ``fps train``'s step lines."""

    def __init__(self, description: str, log: Callable[[str], None], unit: str = "images") -> None:
        self.description, self.log, self.unit = description, log, unit
        self.total = self.done = self.next_tenth = 0
        self.started = 0.0

    def callbacks(self) -> tuple[Callable[[int], None], Callable[[int], None]]:
        return self.start, self.advance

    def start(self, total: int) -> None:
        self.total, self.done, self.next_tenth, self.started = total, 0, 1, time.perf_counter()

    def advance(self, n: int) -> None:
        self.done += n
        if not self.total or self.done * 10 < self.next_tenth * self.total:
            return
        self.next_tenth = self.done * 10 // self.total + 1
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        left = max(self.total - self.done, 0) / rate
        self.log(
            f"{self.description}: {self.done:,}/{self.total:,} {self.unit} ({self.done / self.total:.0%}), "
            f"{rate:,.1f} {_per_second(self.unit)}, ETA {_clock(left)}"
        )


def _json_error(message: str, exit_code: int) -> None:
    """Under ``--json`` a failure is still one JSON object on stdout, so ``| jq`` and ``json.load`` keep working."""
    typer.echo(json.dumps({"error": message, "exit_code": exit_code}))


def _json_failures(command: Callable[..., None]) -> Callable[..., None]:
    """Under ``--json``, a usage error found by the command (exit code 2) also prints one JSON error object."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except typer.BadParameter as e:
            if kwargs.get("as_json"):
                _json_error(e.format_message(), e.exit_code)
            raise

    return run


@contextlib.contextmanager
def _exits(as_json: bool = False) -> Iterator[None]:
    """Turn the library's user-fixable errors into one line on stderr and exit code 1 (and, under ``--json``, one
    JSON object on stdout).

    Under torchrun the line names the rank; torchrun then stops the other ranks, so a failure never hangs.
    """
    from .errors import FpsError, OptionsError, OutputClashError

    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    prefix = f"rank {rank}: " if rank is not None else ""
    try:
        yield
    except OptionsError as e:  # options that do not combine: a usage error naming the flag
        raise _usage(e.message, e.flag) from None
    except OutputClashError as e:  # two paths that must differ: a usage error, raised before any work
        raise _usage(str(e), e.flag) from None
    except FpsError as e:
        typer.echo(f"{prefix}error: {e}", err=True)
        if as_json and rank in (None, "0"):
            _json_error(str(e), 1)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        typer.echo(f"{prefix}interrupted", err=True)
        if as_json:
            _json_error("interrupted", 130)
        raise typer.Exit(130) from None
    finally:
        if prefix:
            from .distributed import shutdown

            shutdown()


def _count(n: int, noun: str, plural: str | None = None) -> str:
    """``1 epoch``, ``2 epochs``, ``1,000 images``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {plural or noun + 's'}"


def _usage(message: str, param: str | None = None) -> typer.BadParameter:
    """A usage error (exit code 2), naming the flag at fault."""
    return typer.BadParameter(message, param_hint=param)


def _device(name: str) -> Any:
    """``--device`` as a torch device (``auto``: CUDA when present); an unknown name is a usage error."""
    from .selector import resolve_device

    try:
        return resolve_device(name)
    except ValueError as e:
        raise _usage(str(e), "--device") from None


def _model_folder(name: str | None) -> Path | None:
    """The local folder a ``local-dir:PATH`` or ``hf:PATH`` model reads (an input no output may replace)."""
    for prefix in ("local-dir:", "hf:"):
        if name and name.startswith(prefix) and Path(name[len(prefix) :]).expanduser().is_dir():
            return Path(name[len(prefix) :]).expanduser()
    return None


def _plan_on_base(source: Path, flag: str, spec: Any, *, force: bool) -> Any:
    """An :class:`~fps_cli.outputs.OutputPlan` whose inputs are ``source`` (the mask or delta, given by ``flag``)
    and the files the base model ``spec`` is read from: no output of the command may replace any of them."""
    from .outputs import OutputPlan

    plan = OutputPlan(force=force)
    plan.input(source, flag)
    plan.input(spec.checkpoint, "--checkpoint")
    plan.input(_model_folder(spec.name), "--model")
    return plan


def _read_input(reader: Callable[[Path], Any], path: Path, next_step: str) -> Any:
    """Read a mask or delta; a missing one says the step that makes it (``run fps select first, or pass --mask``)."""
    from .errors import FileFormatError

    try:
        return reader(path)
    except FileFormatError as e:
        if path.exists():
            raise
        raise FileFormatError(f"{e}: {next_step}") from None


@contextlib.contextmanager
def _flags() -> Iterator[None]:
    """Options the library refuses (:class:`~fps_cli.errors.OptionsError`) are usage errors naming the flag."""
    from .errors import OptionsError

    try:
        yield
    except OptionsError as e:
        raise _usage(e.message, e.flag) from None


# Options shared by the commands that load a model.
ModelOpt = Annotated[
    str | None,
    typer.Option(
        "--model",
        "-m",
        help="timm name (vit_base_patch16_224.augreg_in21k), hf-hub:org/name, local-dir:PATH, or hf:ID_OR_PATH for a "
        "Hugging Face transformers image- or text-classification model.",
        rich_help_panel="Model",
    ),
]
PretrainedOpt = Annotated[
    bool,
    typer.Option("--pretrained/--no-pretrained", help="Load pretrained weights.", rich_help_panel="Model"),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint",
        "--initial-checkpoint",
        help="Local weights (safetensors or torch file).",
        rich_help_panel="Model",
    ),
]
NumClassesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-classes", min=1, help="Size of the new head (default: number of class folders).", rich_help_panel="Model"
    ),
]
ImgSizeOpt = Annotated[
    int | None, typer.Option("--img-size", min=1, help="Input resolution override.", rich_help_panel="Model")
]
OfflineOpt = Annotated[
    bool, typer.Option("--offline", help="Never touch the network (cached weights only).", rich_help_panel="Model")
]
TrustRemoteCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Let an hf: model run code from its repository (off by default; only for repositories you trust).",
        rich_help_panel="Model",
    ),
]
DataOpt = Annotated[
    Path | None,
    typer.Option(
        "--data",
        "-d",
        help="Image folder (DIR/<class>/..., DIR/train|val|test/<class>/...), a dataset as published (CUB_200_2011 "
        "as downloaded, VTAB-1k list files, FGVC JSON splits), a .tar, or a timm dataset (hfds/NAME, "
        "torch/NAME@ROOT).",
        rich_help_panel="Data",
    ),
]
DatasetFormatOpt = Annotated[
    Literal[DATASET_FORMATS],
    typer.Option(
        "--dataset-format",
        help="How to read --data: detected from its files (auto), or forced where a folder fits two layouts.",
        rich_help_panel="Data",
    ),
]
# timm train.py's spellings are accepted beside fps's own (-b, -j/--workers, --amp-dtype, ...); help shows both.
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", "-b", min=1, rich_help_panel="Data")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--num-workers",
        "--workers",
        "-j",
        min=0,
        help="DataLoader workers (default: by device).",
        rich_help_panel="Data",
    ),
]
# timm's --amp-dtype names (float16, bfloat16) beside fps's (fp16, bf16).
PRECISION_NAMES = (*PRECISIONS, "float32", "bfloat16", "float16")
PRECISION_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (CUDA if present), cpu, cuda or cuda:N.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object with the result to stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress or logs.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Replace existing outputs.")]
# The task seam (fps_cli.tasks): --task forces the task of an hf: model; the text options are text classification's
# data options, recorded in the mask so that train and eval read the data as select did.
TaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="image-classification, text-classification or causal-lm (default: from the model's config).",
        rich_help_panel="Model",
    ),
]
TextFieldOpt = Annotated[
    str | None,
    typer.Option("--text-field", help="Text: the field holding the text (default: text).", rich_help_panel="Data"),
]
LabelFieldOpt = Annotated[
    str | None,
    typer.Option("--label-field", help="Text: the field holding the label (default: label).", rich_help_panel="Data"),
]
TextPairFieldOpt = Annotated[
    str | None,
    typer.Option("--text-pair-field", help="Text: a second text field (sentence pairs).", rich_help_panel="Data"),
]
MaxLengthOpt = Annotated[
    int | None,
    typer.Option(
        "--max-length",
        min=2,
        help="Text: truncate to this many tokens (default: the tokenizer's limit; causal LM: 1024).",
        rich_help_panel="Data",
    ),
]
ValSplitOpt = Annotated[
    float | None,
    typer.Option(
        "--val-split",
        help="Text: carve this fraction of a single data file out as the validation split (seeded).",
        rich_help_panel="Data",
    ),
]


PackingOpt = Annotated[
    bool,
    typer.Option(
        "--packing",
        help="Causal LM: concatenate each batch's examples and cut them into rows of --max-length tokens.",
        rich_help_panel="Data",
    ),
]
TrainOnInputsOpt = Annotated[
    bool,
    typer.Option(
        "--train-on-inputs",
        help="Causal LM: the loss covers every token, not only completions / assistant turns.",
        rich_help_panel="Data",
    ),
]


def _check_task(task: str | None) -> None:
    """An unknown ``--task`` is a usage error naming the known ones (the registry is read only when it is given)."""
    if task is not None:
        from .tasks import task_names

        if task not in task_names():
            raise _usage(f"unknown task {task!r}; expected one of {', '.join(task_names())}", "--task")


TASK_OPTION_NAMES = (
    "task",
    "text_field",
    "label_field",
    "text_pair_field",
    "max_length",
    "val_split",
    "packing",
    "train_on_inputs",
)


def _data_options(
    text_field: str | None,
    label_field: str | None,
    text_pair_field: str | None,
    max_length: int | None,
    val_split: float | None,
    dataset_format: str = "auto",
    packing: bool = False,
    train_on_inputs: bool = False,
) -> dict[str, Any]:
    """The task's data options given on the command line (``None`` / ``auto``: not given, the recorded or default
    value); ``--dataset-format`` is the image task's."""
    if val_split is not None and not 0 < val_split < 1:
        raise _usage(f"a fraction strictly between 0 and 1, got {val_split:g}", "--val-split")
    given = {
        "text_field": text_field,
        "label_field": label_field,
        "text_pair_field": text_pair_field,
        "max_length": max_length,
        "val_split": val_split,
        "dataset_format": dataset_format if dataset_format != "auto" else None,
        # Switches: off means not given (the recorded value, or the default, holds).
        "packing": packing or None,
        "train_on_inputs": train_on_inputs or None,
    }
    return {k: v for k, v in given.items() if v is not None}


class _Percent(float):
    """A ``--budget`` given as a percentage (``0.77%``): the fraction, and the text the user wrote."""

    text = ""


def _parse_budget(value: str | float) -> float:
    """``--budget``: a fraction (``0.0077``) or a percentage (``0.77%``, read as 0.0077 with a notice)."""
    if isinstance(value, float):
        return value
    text = str(value).strip()
    number = text[:-1].strip() if text.endswith("%") else text
    try:
        fraction = float(number)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a number; give a fraction (0.0077) or a percentage (0.77%)", param_hint="--budget"
        ) from None
    if not text.endswith("%"):
        return fraction
    percent = _Percent(fraction / 100)
    percent.text = text
    return percent


@app.command("select", cls=_Command)
@_json_failures
def select_cmd(
    model: ModelOpt = None,
    data: DataOpt = None,
    dataset_format: DatasetFormatOpt = "auto",
    budget: Annotated[
        float | None,
        typer.Option(
            parser=_parse_budget,
            metavar="FRACTION",
            help=f"Fraction of all parameters trainable in total, strictly between 0 and 1 (selected + head + "
            f"biases), or a percentage (0.77%); default {DEFAULT_BUDGET}.",
            rich_help_panel="Selection",
        ),
    ] = None,
    topk_per_neuron: Annotated[
        int | None,
        typer.Option(
            "--topk-per-neuron",
            min=1,
            help="Exactly K entries per output neuron, instead of --budget.",
            rich_help_panel="Selection",
        ),
    ] = None,
    method: Annotated[
        Literal[SELECT_METHODS] | None,
        typer.Option(
            help="Scoring method: fps, or a baseline (gps, weight, activation, random); or a fixed mask with no data "
            "pass and no budget: full (everything), linear (head only), bias (head + biases, BitFit). Default: fps; "
            "with --from-scores, gps for a gradient score file.",
            rich_help_panel="Selection",
        ),
    ] = None,
    granularity: Annotated[Literal[GRANULARITIES], typer.Option(rich_help_panel="Selection")] = "neuron",
    norm: Annotated[Literal[NORMS], typer.Option(help="Activation statistic.", rich_help_panel="Selection")] = "l1",
    train_bias: Annotated[
        bool, typer.Option("--train-bias/--no-train-bias", help="Biases fully trainable.", rich_help_panel="Selection")
    ] = True,
    from_scores: Annotated[
        Path | None,
        typer.Option(
            "--from-scores", help="Re-select from a saved score file, with no data pass.", rich_help_panel="Selection"
        ),
    ] = None,
    gps_loss: Annotated[
        Literal[GPS_LOSSES] | None,
        typer.Option(
            "--gps-loss",
            help="GPS loss: supcon (supervised contrastive on the pre-logits feature, as GPS) or ce (cross-entropy "
            "on the head). Default: supcon.",
            rich_help_panel="Selection",
        ),
    ] = None,
    no_augment: Annotated[
        bool,
        typer.Option(
            "--no-augment",
            "--no-aug",
            help="GPS: both views are the deterministic eval transform (exactly reproducible mask).",
            rich_help_panel="Selection",
        ),
    ] = False,
    anchor: Annotated[
        Path | None,
        typer.Option(
            "--anchor",
            help="Experimental: an fps score file of the same model on other data; scale each activation statistic "
            "by its growth a_task / (a_anchor + eps).",
            rich_help_panel="Selection",
        ),
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Mask file to write.", rich_help_panel="Output")] = Path(
        "mask.safetensors"
    ),
    scores: Annotated[Path, typer.Option("--scores", help="Score file to write.", rich_help_panel="Output")] = Path(
        "scores.safetensors"
    ),
    no_scores: Annotated[
        bool, typer.Option("--no-scores", help="Write no score file.", rich_help_panel="Output")
    ] = False,
    pretrained: PretrainedOpt = True,
    checkpoint: CheckpointOpt = None,
    num_classes: NumClassesOpt = None,
    img_size: ImgSizeOpt = None,
    offline: OfflineOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    batch_size: BatchSizeOpt = 32,
    num_workers: WorkersOpt = None,
    max_samples: Annotated[
        int | None, typer.Option(min=1, help="A seeded random subset of this many images.", rich_help_panel="Data")
    ] = None,
    skip_bad_images: Annotated[
        bool, typer.Option("--skip-bad-images", help="Skip and count unreadable images.", rich_help_panel="Data")
    ] = False,
    device: DeviceOpt = "auto",
    precision: Annotated[
        Literal[PRECISION_NAMES],
        typer.Option("--precision", "--amp-dtype", help="Autocast precision of the forward pass."),
    ] = "fp32",
    seed: Annotated[int, typer.Option(help="Seed of sampling, initialisation and random scores.")] = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    task: TaskOpt = None,
    text_field: TextFieldOpt = None,
    label_field: LabelFieldOpt = None,
    text_pair_field: TextPairFieldOpt = None,
    max_length: MaxLengthOpt = None,
    val_split: ValSplitOpt = None,
    packing: PackingOpt = False,
    train_on_inputs: TrainOnInputsOpt = False,
) -> None:
    """Score every weight with one forward pass and write a mask (and a score file).

    --method gps is the GPS baseline (a backward pass, needs class folders); --anchor is experimental.
    """
    started = time.perf_counter()
    precision = PRECISION_ALIASES.get(precision, precision)
    with _flags():
        from .options import SelectOptions, check_finite

        check_finite(budget=budget)  # before the inputs, as always: a NaN budget is what the user hears about first
        _check_task(task)
        if from_scores is None and (model is None or data is None):
            raise _usage("--model and --data are required (or re-select with --from-scores FILE)", "--model/--data")
        select_options = functools.partial(
            SelectOptions,
            norm=norm,
            granularity=granularity,
            budget=budget,
            topk_per_neuron=topk_per_neuron,
            train_bias=train_bias,
            seed=seed,
            gps_loss=gps_loss,
            augment=not no_augment,
            from_scores=from_scores is not None,
            anchor=anchor is not None,
        )
        options = select_options(method=method or "fps")  # every rule but the one a score file's kind decides
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    with _exits(as_json):
        from .distributed import from_env, init
        from .formats import save_mask, score_statistic
        from .models import ModelSpec
        from .outputs import OutputPlan
        from .selector import reselect, run_baseline, run_select
        from .selector import write_scores as write_score_file

        if method is None:  # fps; gps for a gradient score file
            gradient_file = from_scores is not None and score_statistic(from_scores) == "gradient"
            options = select_options(method="gps" if gradient_file else "fps")

        dist = from_env()  # under torchrun only rank 0 checks and writes outputs, and prints
        report = Reporter(quiet=quiet or not dist.is_main, as_json=as_json)
        write_scores = not no_scores and from_scores is None and not options.baseline
        plan = OutputPlan(force=force)
        for path, flag in ((from_scores, "--from-scores"), (checkpoint, "--checkpoint"), (anchor, "--anchor")):
            plan.input(path, flag)
        plan.input(_model_folder(model), "--model")
        plan.file(out, "--out")
        if write_scores:
            plan.file(scores, "--scores")
        if dist.is_main:
            plan.check()
        for warning in _select_warnings(options, budget, topk_per_neuron, pretrained=pretrained or model is None):
            report.log(warning)
        dev = init(dist, _device(device))
        spec = None
        data_options = _data_options(
            text_field, label_field, text_pair_field, max_length, val_split, dataset_format, packing, train_on_inputs
        )
        if model is not None:
            spec = ModelSpec(
                model, pretrained, checkpoint, num_classes, img_size, offline, trust_remote_code, task=task
            )
        if data is not None and from_scores is None:  # the data is listed (and refused) before any model is built
            from .tasks import open_dataset

            data = open_dataset(spec, data, data_options)
        if options.baseline:
            result = run_baseline(spec, data, options.method, seed=seed, data_options=data_options)
        elif from_scores is not None:
            result = reselect(
                from_scores, options, spec=spec, device=dev, anchor=anchor, trust_remote_code=trust_remote_code
            )
        else:
            weights = "" if pretrained else ", random weights: --no-pretrained"
            report.log(f"fps select: {model} on {data.location} ({dev.type}, {precision}{weights})")
            report.log(data.describe())
            unit = getattr(data, "item_name", "images")
            with report.progress("scoring", lines=True, preparing="building the model", unit=unit) as (
                on_start,
                on_batch,
            ):
                result = run_select(
                    spec,
                    data,
                    options,
                    device=dev,
                    precision=precision,
                    batch_size=batch_size,
                    num_workers=num_workers,
                    max_samples=max_samples,
                    skip_bad_images=skip_bad_images,
                    anchor=anchor,
                    on_start=on_start,
                    on_batch=on_batch,
                    dist=dist,
                    data_options=data_options,
                )
        if dist.is_main:  # the mask and the scores: all new or all old, even after a kill
            with plan.transaction() as tx:
                if write_scores:
                    write_score_file(scores, result, tx=tx)
                save_mask(out, result.mask, tx=tx)
        if not dist.is_main:
            return

    prov = result.mask.provenance
    if dist.enabled:
        report.log(f"{dist.world_size} processes, {prov['num_samples']} images in all")
    if result.skipped_images:
        report.log(f"skipped {_count(len(result.skipped_images), 'unreadable image')}")
    for note in result.notes:
        report.log(note)
    # seconds: the whole command (model, data pass, selection, files); pass_seconds: the data pass alone.
    report.result(*_select_summary(result, out, scores if write_scores else None, time.perf_counter() - started))


def _select_warnings(
    options: Any, budget: float | None, topk_per_neuron: int | None, *, pretrained: bool = True
) -> list[str]:
    """What ``fps select`` accepts but says something about: a budget given as a percentage, an unusually large
    budget, an ignored one, random weights."""
    lines = []
    if isinstance(budget, _Percent):
        lines.append(f"notice: --budget {budget.text} read as the fraction {budget:g}")
    if not pretrained:
        lines.append(
            "warning: --no-pretrained: selecting on randomly initialised weights, which is for testing; the mask "
            "will not carry over to the pretrained model"
        )
    if options.baseline and (budget is not None or topk_per_neuron is not None):
        flag = "--budget" if budget is not None else "--topk-per-neuron"
        return [*lines, f"{flag} is ignored: --method {options.method} has a fixed trainable set"]
    if budget is not None and budget > LARGE_BUDGET:
        # A fraction that may have been meant as a percentage (0.77 for 0.77%): name the fraction it would be.
        meant = "" if isinstance(budget, _Percent) else f"; if you meant {budget:g}%, that is --budget {budget / 100:g}"
        lines.append(
            f"warning: --budget {budget:g} makes {budget:.0%} of the parameters trainable; sparse fine-tuning "
            f"budgets are usually below 0.01 (the default is {DEFAULT_BUDGET}); --method full trains everything"
            f"{meant}"
        )
    return lines


def _select_summary(result: Any, out: Path, scores: Path | None, seconds: float) -> tuple[dict[str, Any], str]:
    """``fps select``'s result: the JSON payload and the human summary."""
    mask = result.mask
    prov = mask.provenance
    payload = {
        "mask": str(out),
        "scores": str(scores) if scores is not None else None,
        "model": prov["model"],
        "method": prov["method"],
        "norm": prov["norm"],
        "gps_loss": prov.get("gps_loss"),
        "augment": prov.get("augment"),
        "anchor": prov.get("anchor"),
        "granularity": prov["granularity"],
        "budget": prov["budget"],
        "budget_ignored": bool(prov.get("budget_ignored", False)),
        "topk_per_neuron": prov["topk_per_neuron"],
        "selected": mask.selected,
        "fully_trainable": mask.trainable - mask.selected,
        "trainable": mask.trainable,
        "total_params": mask.total_params,
        "trainable_fraction": mask.trainable / mask.total_params,
        "layers": len(mask.indices),
        "num_classes": prov["num_classes"],
        "num_samples": prov["num_samples"],
        "skipped_images": prov["skipped_images"],
        "seconds": round(seconds, 3),
        "pass_seconds": round(result.pass_seconds, 3),  # 0 with --from-scores or a baseline
    }
    human = (
        f"--method {prov['method']}: trainable {mask.trainable:,} of {mask.total_params:,} parameters "
        f"({payload['trainable_fraction']:.2%}), no selection\nwrote {out}"
        if prov.get("budget_ignored")
        else f"selected {_count(mask.selected, 'entry', 'entries')} in {_count(len(mask.indices), 'layer')}; "
        f"trainable {mask.trainable:,} of "
        f"{mask.total_params:,} parameters ({payload['trainable_fraction']:.2%}) with head and biases\n"
        f"wrote {out}" + (f" and {scores}" if scores is not None else "")
    )
    return payload, human


# The training commands default every model option to what the mask (or delta) records: None means "as recorded".
PretrainedOrRecordedOpt = Annotated[
    bool | None,
    typer.Option(
        "--pretrained/--no-pretrained",
        help="Load pretrained weights (default: as the file records).",
        rich_help_panel="Model",
        show_default=False,
    ),
]
RecordedNumClassesOpt = Annotated[
    int | None,
    typer.Option(
        "--num-classes", min=1, help="Size of the head (default: as the mask records).", rich_help_panel="Model"
    ),
]
RecordedImgSizeOpt = Annotated[
    int | None,
    typer.Option("--img-size", min=1, help="Input resolution (default: as the file records).", rich_help_panel="Model"),
]
OPTIMIZER_NAMES = ("adamw", "sgd")


def _describe(event: dict[str, Any], unit: str = "images") -> str:
    """One progress line for a training event (``unit``: what the data's examples are called, for the rate)."""
    kind = event["event"]
    if kind == "step":
        rate = f", {event['images_per_s']:.1f} {_per_second(unit)}" if event.get("images_per_s") else ""
        return (
            f"epoch {event['epoch']} step {event['step']}/{event['total_steps']}: loss {event['loss']:.4f}, "
            f"lr {event['lr']:.2e}{rate}"
        )
    if kind == "epoch":
        val = ""
        if "val_perplexity" in event:  # a language model: top-1 is next-token accuracy
            val = f"; val loss {event['val_loss']:.4f}, perplexity {event['val_perplexity']:.2f}"
        elif "val_top1" in event:
            top5 = f", top-5 {event['val_top5']:.2f}%" if "val_top5" in event else ""
            val = f"; val top-1 {event['val_top1']:.2f}%{top5}, loss {event['val_loss']:.4f}"
        return (
            f"epoch {event['epoch']} done: train loss {event['train_loss']:.4f}, top-1 {event['train_top1']:.2f}%"
            f"{val} ({event['seconds']:.1f} s)"
        )
    if kind == "start":
        resumed = f", resuming after epoch {event['resumed_from']}" if event["resumed_from"] else ""
        ranks = f", {event['world_size']} processes" if event.get("world_size", 1) > 1 else ""
        return (
            f"training {event['trainable']:,} of {event['total_params']:,} parameters on {event['train_samples']} "
            f"{event.get('items', 'images')} ({event['val_samples']} validation), {_count(event['epochs'], 'epoch')} x "
            f"{_count(event['steps_per_epoch'], 'step')}{resumed}{ranks}"
        )
    return f"warning: {event.get('message', event)}"


@app.command("train", cls=_Command)
@_json_failures
def train_cmd(
    mask: Annotated[Path, typer.Option("--mask", help="Mask file from fps select.", rich_help_panel="Input")] = Path(
        "mask.safetensors"
    ),
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="Image folder, published dataset, .tar or timm dataset (default: the one the mask records).",
            rich_help_panel="Data",
        ),
    ] = None,
    dataset_format: DatasetFormatOpt = "auto",
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="Delta file to write; the checkpoint (.ckpt) and metrics log (.metrics.jsonl) go beside it.",
            rich_help_panel="Output",
        ),
    ] = Path("delta.safetensors"),
    epochs: Annotated[int, typer.Option(rich_help_panel="Training")] = 10,
    lr: Annotated[float, typer.Option(min=0.0, help="Peak learning rate.", rich_help_panel="Training")] = 1e-3,
    weight_decay: Annotated[
        float,
        typer.Option(
            min=0.0, help="Decoupled weight decay (deltas and matrices, not biases).", rich_help_panel="Training"
        ),
    ] = 1e-4,
    warmup_epochs: Annotated[
        float, typer.Option(min=0.0, help="Linear warmup, then cosine decay (per step).", rich_help_panel="Training")
    ] = 1.0,
    optimizer: Annotated[
        Literal[OPTIMIZER_NAMES], typer.Option("--optimizer", "--opt", rich_help_panel="Training")
    ] = "adamw",
    label_smoothing: Annotated[
        float, typer.Option("--label-smoothing", "--smoothing", min=0.0, max=0.99, rich_help_panel="Training")
    ] = 0.1,
    grad_accum: Annotated[
        int,
        typer.Option(
            "--grad-accum",
            "--grad-accum-steps",
            min=1,
            help="Forward passes per optimizer step.",
            rich_help_panel="Training",
        ),
    ] = 1,
    clip_grad: Annotated[
        float | None, typer.Option(min=0.0, help="Clip the gradient norm to this value.", rich_help_panel="Training")
    ] = None,
    grad_checkpointing: Annotated[
        bool,
        typer.Option(
            "--grad-checkpointing",
            help="transformers models: recompute each block's activations in the backward (less memory, ~1/3 slower).",
            rich_help_panel="Training",
        ),
    ] = False,
    no_augment: Annotated[
        bool,
        typer.Option(
            "--no-augment", "--no-aug", help="Eval transform instead of timm's train transform.", rich_help_panel="Data"
        ),
    ] = False,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Continue an interrupted run from its checkpoint.", rich_help_panel="Output"),
    ] = False,
    log_every: Annotated[
        int,
        typer.Option(
            "--log-every",
            "--log-interval",
            min=1,
            help="Log every this many optimizer steps.",
            rich_help_panel="Output",
        ),
    ] = 10,
    log_wandb: Annotated[
        bool,
        typer.Option(
            "--log-wandb",
            help="Also log each epoch's summary row to Weights & Biases (needs pip install 'fps-cli\\[wandb]').",
            rich_help_panel="Output",
        ),
    ] = False,
    model: ModelOpt = None,
    pretrained: PretrainedOrRecordedOpt = None,
    checkpoint: CheckpointOpt = None,
    num_classes: RecordedNumClassesOpt = None,
    img_size: RecordedImgSizeOpt = None,
    offline: OfflineOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    batch_size: BatchSizeOpt = 32,
    num_workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        Literal[PRECISION_NAMES],
        typer.Option("--precision", "--amp-dtype", help="Autocast precision (fp16 adds a GradScaler)."),
    ] = "fp32",
    seed: Annotated[int, typer.Option(help="Seed of shuffling and augmentation.")] = 0,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    ctx: typer.Context = None,
    task: TaskOpt = None,
    text_field: TextFieldOpt = None,
    label_field: LabelFieldOpt = None,
    text_pair_field: TextPairFieldOpt = None,
    max_length: MaxLengthOpt = None,
    val_split: ValSplitOpt = None,
    packing: PackingOpt = False,
    train_on_inputs: TrainOnInputsOpt = False,
) -> None:
    """Fine-tune only the weights a mask selects (plus head and biases) and write a delta file."""
    precision = PRECISION_ALIASES.get(precision, precision)
    with _flags():
        from .options import TrainConfig

        config = TrainConfig(
            epochs=epochs,
            lr=lr,
            weight_decay=weight_decay,
            warmup_epochs=warmup_epochs,
            optimizer=optimizer,
            batch_size=batch_size,
            grad_accum=grad_accum,
            label_smoothing=label_smoothing,
            clip_grad=clip_grad,
            augment=not no_augment,
            precision=precision,
            seed=seed,
        )
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    _check_task(task)
    # The task's options appear in args.yaml only when given (an image run's records keep their form).
    arguments = {k: v for k, v in ctx.params.items() if v not in (None, False) or k not in TASK_OPTION_NAMES}
    data_options = _data_options(
        text_field, label_field, text_pair_field, max_length, val_split, dataset_format, packing, train_on_inputs
    )
    with _exits(as_json):
        from . import sampled_product
        from .distributed import from_env, init
        from .finetune import RunFiles, run_train, spec_from_provenance
        from .formats import read_mask
        from .records import require_wandb

        dist = from_env()  # under torchrun only rank 0 checks and writes outputs, logs and prints
        report = Reporter(quiet=quiet or not dist.is_main, as_json=as_json)
        the_mask = _read_input(read_mask, mask, "run fps select first, or pass --mask FILE")
        spec = spec_from_provenance(
            the_mask.provenance,
            model=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            num_classes=num_classes,
            img_size=img_size,
            offline=offline,
            trust_remote_code=trust_remote_code,
            task=task,
        )
        # The delta, checkpoint and records are one unit (finetune.RunFiles): checked together, before any work.
        run_files = RunFiles(out, force=force, args=arguments)
        plan = _plan_on_base(mask, "--mask", spec, force=force)
        plan.file(out, "--out")
        for path, what in zip(run_files.files, RUN_FILE_ROLES, strict=True):
            plan.file(path, "--out", f"{what} (beside --out)")
        if dist.is_main:
            plan.check(exists=False)
            run_files.check_exists(resume=resume)
        if log_wandb and dist.is_main:
            require_wandb()
        sampled_product.chosen()  # FPS_SAMPLED_PRODUCT checked before any work
        dev = init(dist, _device(device))
        # The resolved arguments (timm's args.yaml): what was given, with the mask's recorded values filled in.
        arguments.update(
            model=spec.name,
            pretrained=spec.pretrained,
            checkpoint=spec.checkpoint,
            num_classes=spec.num_classes,
            img_size=spec.img_size,
            data=data if data is not None else the_mask.provenance.get("data"),
            device=str(dev),
        )
        run_files.set_args(arguments)
        weights = "" if spec.pretrained else ", random weights: --no-pretrained"
        report.log(f"fps train: {spec.name} with {mask} ({dev.type}, {precision}{weights})")
        from .finetune import training_data

        _, folder, _, _ = training_data(data, the_mask.provenance, str(mask), spec, data_options)
        report.log(folder.describe())
        unit = getattr(folder, "item_name", "images")
        bar = (
            report.progress("training", unit=unit) if dist.is_main else contextlib.nullcontext(((lambda n: None),) * 2)
        )
        events = _TrainEvents(report, run_files, resume=resume, quiet=quiet, dist=dist, unit=unit)
        events.wandb_args = (arguments, out.stem) if log_wandb else None
        try:
            with bar as events.bar:
                result = run_train(
                    the_mask,
                    config,
                    spec=spec,
                    data_dir=folder,
                    device=dev,
                    num_workers=num_workers,
                    checkpoint_path=run_files.checkpoint,
                    resume=resume,
                    mask_path=mask,
                    log_every=log_every,
                    on_event=events,
                    dist=dist,
                    run=run_files,
                    data_options=data_options,
                    grad_checkpointing=grad_checkpointing,
                )
        except KeyboardInterrupt:
            if run_files.checkpoint.exists():
                report.log(
                    f"the last complete epoch is in {run_files.checkpoint}; continue with the same command and --resume"
                )
            raise
        finally:
            events.close()
        if not dist.is_main:
            return
        run_files.finish(result.delta, {"event": "end", "delta": str(out), **result.metrics})
    report.result(*_train_summary(result, run_files, epochs))


# What each file of a run unit is, in RunFiles.files' order (for the output checks' messages).
RUN_FILE_ROLES = ("the training checkpoint", "the metrics log", "the summary", "the arguments record")


class _TrainEvents:
    """``fps train``'s ``on_event``: the progress bar, the run's records, wandb and the stderr lines.

    Attributes:
        bar: the progress bar's ``(on_total, on_images)`` callbacks, set while training runs.
        wandb_args: ``(arguments, run name)`` to log to Weights & Biases once training starts; ``None``: off.
    """

    def __init__(
        self, report: Reporter, run_files: Any, *, resume: bool, quiet: bool, dist: Any, unit: str = "images"
    ) -> None:
        self.report, self.run_files, self.resume, self.quiet, self.dist = report, run_files, resume, quiet, dist
        self.unit = unit
        self.bar: tuple[Callable[[int], None], Callable[[int], None]] = ((lambda n: None),) * 2
        self.wandb_args: tuple[dict[str, Any], str] | None = None
        self.started = False
        self.wandb: list[Any] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if not self.dist.is_main:
            return
        on_total, on_images = self.bar
        if event["event"] == "start":
            # Validation is over; the log and records are written with the first checkpoint, never before.
            self.run_files.begin(event["resumed_from"] if self.resume else None)
            self.started = True
            if self.wandb_args is not None:
                from .records import WandbLog

                arguments, name = self.wandb_args
                self.wandb.append(WandbLog(arguments, name=name))
        if event["event"] == "progress":  # every optimizer step: the bar only, not the records
            on_images(event["images"])
            return
        if event["event"] == "start":
            on_total(event["epochs"] * event["train_samples"])
            on_images(event["resumed_from"] * event["train_samples"])
        if self.started:
            self.run_files.record(event)
        for run in self.wandb:
            run(event)
        if event["event"] != "step" or not self.quiet:
            self.report.log(_describe(event, self.unit))

    def close(self) -> None:
        for run in self.wandb:
            run.finish()


def _train_summary(result: Any, run_files: Any, epochs: int) -> tuple[dict[str, Any], str]:
    """``fps train``'s result: the JSON payload and the human summary."""
    delta = result.delta
    out, metrics_path, summary_path, args_path = run_files.delta, run_files.log, run_files.summary, run_files.args
    payload = {
        "delta": str(out),
        "metrics_log": str(metrics_path),
        "summary": str(summary_path),
        "args": str(args_path),
        "model": delta.provenance["model"],
        "epochs": epochs,
        "resumed_from": result.resumed_from,
        "trained": delta.trained,
        "optimizer_state_elements": result.optimizer_state[0],
        "total_params": sum(math.prod(s) for s in delta.shapes.values()),
        "metrics": result.metrics,
        "seconds": round(result.seconds, 3),
    }
    final = result.metrics
    score = f"val top-1 {final['val_top1']:.2f}%" if "val_top1" in final else "no validation split"
    if "val_perplexity" in final:
        score = f"val perplexity {final['val_perplexity']:.2f}"
    human = (
        f"trained {delta.trained:,} of {payload['total_params']:,} parameters for {_count(epochs, 'epoch')} "
        f"(train loss {final['train_loss']:.4f}; {score})\n"
        f"wrote {out} (log {metrics_path}, summary {summary_path}, arguments {args_path})"
    )
    return payload, human


@app.command("eval", cls=_Command)
@_json_failures
def eval_cmd(
    delta: Annotated[Path, typer.Option("--delta", help="Delta file from fps train.", rich_help_panel="Input")] = Path(
        "delta.safetensors"
    ),
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            "-d",
            help="Image folder, published dataset, .tar or timm dataset (default: the one the delta records).",
            rich_help_panel="Data",
        ),
    ] = None,
    dataset_format: DatasetFormatOpt = "auto",
    split: Annotated[
        str,
        typer.Option(
            help="Which split to evaluate: val, train, test, or any split the data names (train800, is_train=0, ...).",
            rich_help_panel="Data",
        ),
    ] = "val",
    model: ModelOpt = None,
    pretrained: PretrainedOrRecordedOpt = None,
    checkpoint: CheckpointOpt = None,
    img_size: RecordedImgSizeOpt = None,
    offline: OfflineOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    batch_size: BatchSizeOpt = 32,
    num_workers: WorkersOpt = None,
    device: DeviceOpt = "auto",
    precision: Annotated[
        Literal[PRECISION_NAMES], typer.Option("--precision", "--amp-dtype", help="Autocast precision.")
    ] = "fp32",
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
    task: TaskOpt = None,
    text_field: TextFieldOpt = None,
    label_field: LabelFieldOpt = None,
    text_pair_field: TextPairFieldOpt = None,
    max_length: MaxLengthOpt = None,
    val_split: ValSplitOpt = None,
    packing: PackingOpt = False,
    train_on_inputs: TrainOnInputsOpt = False,
) -> None:
    """Evaluate a base model with a trained delta attached: top-1 / top-5 accuracy and loss."""
    _check_task(task)
    precision = PRECISION_ALIASES.get(precision, precision)
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    report = Reporter(quiet=quiet, as_json=as_json)
    with _exits(as_json):
        from .finetune import run_eval, spec_from_provenance
        from .formats import read_delta

        dev = _device(device)
        the_delta = _read_input(read_delta, delta, "run fps train first, or pass --delta FILE")
        spec = spec_from_provenance(
            the_delta.provenance,
            model=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            img_size=img_size,
            offline=offline,
            trust_remote_code=trust_remote_code,
            task=task,
        )
        from .finetune import training_data

        data_options = _data_options(
            text_field, label_field, text_pair_field, max_length, val_split, dataset_format, packing, train_on_inputs
        )
        _, folder, the_task, _ = training_data(data, the_delta.provenance, str(delta), spec, data_options)
        chosen = folder.split(split)
        item_name = the_task.item_name
        report.log(f"fps eval: {spec.name} with {delta} on the {split} split ({dev.type}, {precision})")
        report.log(f"{folder.layout} layout: {split} is {chosen.name} ({_count(len(chosen.samples), *item_name)})")
        metrics = run_eval(
            the_delta,
            spec=spec,
            data_dir=folder,
            split=split,
            device=dev,
            precision=precision,
            batch_size=batch_size,
            num_workers=num_workers,
            delta_path=delta,
            data_options=data_options,
        )
    for note in metrics.pop("notes", []):
        report.log(note)
    if "perplexity" in metrics:  # a language model
        human = (
            f"{split}: loss {metrics['loss']:.4f}, perplexity {metrics['perplexity']:.2f}, next-token top-1 "
            f"{metrics['top1']:.2f}% over {_count(metrics['tokens'], 'token')}"
        )
        report.result({"delta": str(delta), **metrics}, human)
        return
    top5 = f", top-5 {metrics['top5']:.2f}%" if "top5" in metrics else ""
    samples = _count(metrics["samples"], *item_name)
    human = f"{split}: top-1 {metrics['top1']:.2f}%{top5}, loss {metrics['loss']:.4f} on {samples}"
    report.result({"delta": str(delta), **metrics}, human)


DTYPE_NAMES = ("fp32", "bf16", "fp16")


@app.command("merge", cls=_Command)
@_json_failures
def merge_cmd(
    delta: Annotated[Path, typer.Option("--delta", help="Delta file from fps train.", rich_help_panel="Input")] = Path(
        "delta.safetensors"
    ),
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            metavar="FILE|DIR/",
            help="Merged weight file, or a folder (a path ending in / or an existing directory) to write a timm "
            "local-dir: model (model.safetensors + config.json) or, for hf: models, a save_pretrained folder.",
            rich_help_panel="Output",
        ),
    ] = "merged.safetensors",
    dtype: Annotated[
        Literal[DTYPE_NAMES], typer.Option(help="Data type of the written weights.", rich_help_panel="Output")
    ] = "fp32",
    model: ModelOpt = None,
    pretrained: PretrainedOrRecordedOpt = None,
    checkpoint: CheckpointOpt = None,
    offline: OfflineOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Add a trained delta to its base model and write the full fine-tuned weights."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    report = Reporter(quiet=quiet, as_json=as_json)
    with _exits(as_json):
        from .finetune import spec_from_provenance
        from .formats import read_delta
        from .merge import folder_files, resolve_target, run_merge

        the_delta = _read_input(read_delta, delta, "run fps train first, or pass --delta FILE")
        spec = spec_from_provenance(
            the_delta.provenance,
            model=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            offline=offline,
            trust_remote_code=trust_remote_code,
        )
        target = resolve_target(out)
        plan = _plan_on_base(delta, "--delta", spec, force=force)
        if target.directory:
            plan.folder(target.path, "--out", folder_files(spec.name.startswith("hf:")))
        else:
            plan.file(target.path, "--out")
        plan.check()
        report.log(f"fps merge: {spec.name} + {delta} -> {target.path}{'/' if target.directory else ''} ({dtype})")
        with plan.transaction() as tx:
            result = run_merge(the_delta, target, spec=spec, dtype=dtype, source=str(delta), tx=tx)

    kind = "transformers save_pretrained folder" if spec.name.startswith("hf:") else "timm local-dir: model"
    written = f"{target.path}/ ({kind})" if target.directory else str(target.path)
    payload = {
        "merged": str(target.path),
        "directory": target.directory,
        "weights": str(target.weights),
        "model": result.model,
        "dtype": dtype,
        "tensors": result.tensors,
        "changed_tensors": result.changed_tensors,
        "trained": result.trained,
        "bytes": result.bytes,
    }
    human = (
        f"merged {result.trained:,} trained entries in {_count(result.changed_tensors, 'tensor')} into {result.model} "
        f"({result.tensors} tensors, {dtype}, {result.bytes / 2**20:.1f} MiB)\nwrote {written}"
    )
    report.result(payload, human)


@app.command("export", cls=_Command)
@_json_failures
def export_cmd(
    out: Annotated[
        Path,
        typer.Option("--out", "-o", metavar="DIR/", help="Adapter folder to write.", rich_help_panel="Output"),
    ],
    to: Annotated[
        Literal["peft"], typer.Option("--to", help="Format: a Hugging Face PEFT (SHiRA) adapter folder.")
    ] = "peft",
    delta: Annotated[Path, typer.Option("--delta", help="Delta file from fps train.", rich_help_panel="Input")] = Path(
        "delta.safetensors"
    ),
    model: ModelOpt = None,
    pretrained: PretrainedOrRecordedOpt = None,
    checkpoint: CheckpointOpt = None,
    offline: OfflineOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Write a trained delta as a PEFT adapter folder: PeftModel.from_pretrained(base, DIR) loads it (needs the
    peft extra)."""
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"
    report = Reporter(quiet=quiet, as_json=as_json)
    with _exits(as_json):
        from .finetune import spec_from_provenance
        from .formats import read_delta
        from .peft_adapter import ADAPTER_FILES, export_peft, require_peft

        require_peft()
        the_delta = _read_input(read_delta, delta, "run fps train first, or pass --delta FILE")
        spec = spec_from_provenance(
            the_delta.provenance,
            model=model,
            pretrained=pretrained,
            checkpoint=checkpoint,
            offline=offline,
            trust_remote_code=trust_remote_code,
        )
        plan = _plan_on_base(delta, "--delta", spec, force=force)
        plan.folder(out, "--out", ADAPTER_FILES)
        plan.check()
        report.log(f"fps export: {spec.name} + {delta} -> {out}/ (PEFT SHiRA adapter)")
        with plan.transaction() as tx:
            result = export_peft(the_delta, out, spec=spec, source=str(delta), tx=tx)
        result.delta_bytes = delta.stat().st_size

    payload = {
        "adapter": str(result.path),
        "to": to,
        "peft_type": "SHIRA",
        "r": result.r,
        "sparse_layers": result.sparse_layers,
        "entries": result.entries,
        "padded": result.padded,
        "modules_to_save": result.modules_to_save,
        "whole_params": result.whole_params,
        "bytes": result.bytes,
        "delta_bytes": result.delta_bytes,
    }
    whole = ", ".join(f"{m} ({why})" for m, why in result.modules_to_save.items()) or "none"
    human = (
        f"SHiRA r={result.r}: {result.entries:,} trained entries in {result.sparse_layers} nn.Linear layers, "
        f"padded with {result.padded:,} zeros; modules_to_save: {whole} ({result.whole_params:,} parameters)\n"
        f"adapter {result.bytes / 2**20:.2f} MiB, delta {result.delta_bytes / 2**20:.2f} MiB "
        f"({result.bytes / result.delta_bytes:.2f}x)\nwrote {result.path}/"
    )
    report.result(payload, human)


@app.command("inspect", cls=_Command)
@_json_failures
def inspect_cmd(
    files: Annotated[
        list[Path] | None,
        typer.Argument(help="Mask, score or delta files (default: ./mask.safetensors); two masks are compared."),
    ] = None,
    plot: Annotated[
        Path | None,
        typer.Option(
            "--plot",
            help="Draw a mask (heatmap per block x layer type, histogram per neuron, input columns per layer), or "
            "where two masks differ (.png/.svg).",
        ),
    ] = None,
    export_dense: Annotated[
        Path | None,
        typer.Option("--export-dense", help="Write a mask as dense boolean tensors (safetensors, one per parameter)."),
    ] = None,
    norm: Annotated[
        Literal[NORMS], typer.Option(help="Score files: show a as mean |x| (l1) or root mean square (l2).")
    ] = "l1",
    force: ForceOpt = False,
    as_json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Show what a mask, score or delta file holds (provenance, totals, per layer, per depth), or compare two masks."""
    paths = files or [Path("mask.safetensors")]
    if export_dense is not None and len(paths) != 1:
        raise _usage(f"exports one mask; give one mask file, not {len(paths)} files", "--export-dense")
    if plot is not None and len(paths) > 2:
        raise _usage(f"give one or two masks, not {len(paths)} files", "--plot")
    if plot is not None and plot.suffix.lower() not in (".png", ".svg"):
        raise _usage(f"a plot is written as .png or .svg, not {plot.name!r}", "--plot")
    report = Reporter(quiet=quiet, as_json=as_json)
    with _exits(as_json):
        from .inspection import export_dense as write_dense
        from .inspection import file_kind, inspect_files
        from .outputs import OutputPlan
        from .views import plot_comparison, plot_mask, render, render_comparison

        plan = OutputPlan(force=force)
        for path in paths:
            plan.input(path, "FILE")
        for output, flag in ((plot, "--plot"), (export_dense, "--export-dense")):
            if output is not None:
                plan.file(output, flag)
        plan.check()
        if plot is not None or export_dense is not None:
            flag = "--plot" if plot is not None else "--export-dense"
            for path in paths:
                if file_kind(path) != "mask":
                    raise _usage(f"{path} is a {file_kind(path)} file, not a mask", flag)
        if files is None:  # the default, ./mask.safetensors
            step = "run fps select first, or name the files: fps inspect FILE ..."
            reports, comparison, masks = _read_input(lambda _: inspect_files(paths, norm=norm), paths[0], step)
        else:
            reports, comparison, masks = inspect_files(paths, norm=norm)
        for folder in _data_folders_holding(plot, reports):
            report.log(
                f"warning: --plot {plot} is inside {folder}, the mask's data folder: select and train would read "
                "it as an image; write it elsewhere"
            )
        with plan.transaction() as tx:
            if plot is not None and comparison is not None:
                plot_comparison(reports, comparison, plot, [str(p) for p in paths], tx=tx)
            elif plot is not None:
                plot_mask(reports[0], plot, tx=tx)
            if export_dense is not None:
                write_dense(masks[str(paths[0])], export_dense, tx=tx)

    for output in (plot, export_dense):
        if output is not None:
            report.log(f"wrote {output}")
    if len(reports) == 1:
        payload: dict[str, Any] = reports[0]
    else:
        payload = {"files": reports, "comparison": comparison}
    if not as_json and (plot is not None or export_dense is not None):
        return  # an output file is the result: the report is what fps inspect without --plot prints
    texts = [render(r) for r in reports]
    if comparison is not None:
        texts.append(render_comparison(comparison, str(paths[0]), str(paths[1])))
    report.result(payload, "\n\n".join(texts))


def _data_folders_holding(plot: Path | None, reports: list[dict[str, Any]]) -> list[str]:
    """The masks' data folders that an image ``plot`` would land in (and so become a training image)."""
    if plot is None or plot.suffix.lower() != ".png":
        return []
    where = os.path.realpath(plot)
    folders = {str(r.get("provenance", {}).get("data") or "") for r in reports if r.get("kind") == "mask"}
    return sorted(f for f in folders if f and where.startswith(os.path.realpath(f) + os.sep))


def _terminated(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt  # SIGTERM (kill, docker stop, a scheduler): stop as Ctrl-C does, saying so


def main() -> None:
    """Console entry point (``fps`` and ``python -m fps_cli``)."""
    import signal

    signal.signal(signal.SIGTERM, _terminated)
    app(prog_name="fps")
