"""The option objects of ``fps select`` and ``fps train``, and the rules about which options combine.

:class:`SelectOptions` and :class:`TrainConfig` refuse every combination the command line refuses, with the same
text, raising :class:`~fps_cli.errors.OptionsError` (which names the flag); ``cli.py`` turns it into a usage error.
A library caller therefore cannot build options the CLI would reject. Importing this module must stay cheap (no
torch): the CLI checks its flags before anything heavy is imported. :mod:`.selector` and :mod:`.finetune` re-export
both classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .constants import (
    BASELINE_METHODS,
    DEFAULT_BUDGET,
    GPS_LOSSES,
    GRANULARITIES,
    NORMS,
    OPTIMIZERS,
    PRECISIONS,
    SELECT_METHODS,
    budget_problem,
)
from .errors import BudgetOptionsError, OptionsError

FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max, without importing torch


def check_finite(**values: float | None) -> None:
    """Refuse NaN, infinite and float32-overflowing values (click's ranges let NaN through), naming the flag.

    Raises:
        OptionsError: the first such value, in argument order.
    """
    for name, value in values.items():
        if value is not None and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
            raise OptionsError(f"must be a finite number within float32 range, got {value!r}", _flag(name))


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise OptionsError(f"unknown {what} {value!r}; expected one of {choices}")


@dataclass(frozen=True)
class SelectOptions:
    """How to turn scores into a mask.

    Attributes:
        method: ``fps``, ``gps``, ``weight``, ``activation`` or ``random``; or a baseline with a fixed trainable set
            (``full``, ``linear``, ``bias``: see :func:`~fps_cli.selector.run_baseline`, not ``run_select``).
        norm: ``l1`` or ``l2`` activation statistic.
        granularity: ``neuron``, ``layer`` or ``global``.
        budget: fraction of all parameters trainable in total (selected + fully trainable); ``None``: the default
            budget, unless ``topk_per_neuron`` is given.
        topk_per_neuron: instead of ``budget``, exactly this many entries per candidate row.
        train_bias: biases of Linear / Conv layers fully trainable.
        seed: seed of the ``random`` method (and of everything else in a run).
        gps_loss: ``supcon`` (GPS's supervised contrastive loss) or ``ce`` (cross-entropy on the head); ``None``:
            ``supcon``. Only with ``method="gps"``.
        augment: GPS's random two-view augmentation; ``False`` uses the eval transform for both views (only with
            ``method="gps"``).
        from_scores: the options re-select from a score file (no data pass: GPS options cannot apply).
        anchor: an anchor score file is given (only ``fps`` and ``activation`` have a statistic to anchor).

    Raises:
        OptionsError: a value out of range, or options that do not combine (the flag at fault is named).
        BudgetOptionsError: ``budget`` outside (0, 1) (also a :class:`~fps_cli.errors.BudgetError`).
    """

    method: str = "fps"
    norm: str = "l1"
    granularity: str = "neuron"
    budget: float | None = None
    topk_per_neuron: int | None = None
    train_bias: bool = True
    seed: int = 0
    gps_loss: str | None = None
    augment: bool = True
    from_scores: bool = False
    anchor: bool = False

    def __post_init__(self) -> None:
        _choice(self.method, SELECT_METHODS, "method")
        _choice(self.norm, NORMS, "norm")
        _choice(self.granularity, GRANULARITIES, "granularity")
        if self.gps_loss is not None:
            _choice(self.gps_loss, GPS_LOSSES, "GPS loss")
        # The checks and their order are the command line's: the first problem found is the one reported.
        check_finite(budget=self.budget)
        if self.budget is not None and budget_problem(self.budget):
            raise BudgetOptionsError(budget_problem(self.budget))
        if self.budget is not None and self.topk_per_neuron is not None:
            raise OptionsError("give --budget or --topk-per-neuron, not both", "--topk-per-neuron")
        if self.topk_per_neuron is not None and self.topk_per_neuron < 1:
            raise BudgetOptionsError(f"--topk-per-neuron must be at least 1, got {self.topk_per_neuron}")
        if self.topk_per_neuron is not None and self.granularity != "neuron":
            raise OptionsError(
                "--topk-per-neuron selects per neuron; it cannot be used with --granularity", "--granularity"
            )
        gps_flag = "--gps-loss" if self.gps_loss is not None else "--no-augment" if not self.augment else None
        if gps_flag and self.method != "gps" and not self.from_scores:
            raise OptionsError(f"{gps_flag} only applies to --method gps", gps_flag)
        if self.anchor and self.method not in ("fps", "activation"):
            raise OptionsError(
                f"--anchor scales the activation statistic of fps and activation, not of {self.method}", "--anchor"
            )
        if self.baseline and self.from_scores:
            raise OptionsError(
                f"--method {self.method} needs no scores; give --model and --data instead", "--from-scores"
            )
        if self.method in ("full", "bias") and not self.train_bias:
            raise OptionsError(
                f"--method {self.method} trains every bias; --no-train-bias contradicts it", "--no-train-bias"
            )
        if gps_flag and self.from_scores:
            raise OptionsError(
                f"{gps_flag} shapes a new GPS pass; a score file keeps the settings it was made with", gps_flag
            )
        if self.budget is None and self.topk_per_neuron is None:
            object.__setattr__(self, "budget", DEFAULT_BUDGET)

    @property
    def baseline(self) -> bool:
        """A fixed trainable set (``full``, ``linear``, ``bias``): no scores, no data pass, no budget."""
        return self.method in BASELINE_METHODS

    @property
    def loss(self) -> str:
        """The GPS loss in effect (``gps_loss``, or ``supcon`` when not given)."""
        return self.gps_loss or "supcon"


@dataclass(frozen=True)
class TrainConfig:
    """How to fine-tune. The defaults follow sparse-PEFT practice on VTAB-1k / FGVC (AdamW, lr 1e-3, weight
    decay 1e-4, cosine schedule with warmup) at a length suited to small folders.

    Attributes:
        epochs: passes over the training split.
        lr: peak learning rate (after warmup).
        weight_decay: decoupled weight decay of the selected deltas (pulling them back to the pretrained values)
            and of fully trained matrices; never of biases or other 1-D tensors, never of a frozen weight.
        warmup_epochs: linear warmup length, in epochs (counted in optimizer steps); at most half the run.
        optimizer: ``adamw`` (betas 0.9, 0.999) or ``sgd`` (momentum 0.9, Nesterov off).
        batch_size: images per forward pass.
        grad_accum: forward passes per optimizer step (effective batch ``batch_size * grad_accum``).
        label_smoothing: cross-entropy label smoothing.
        clip_grad: clip the global gradient norm of the trainable values to this value; ``None``: no clipping.
        augment: timm's train transform (random resized crop, flip, colour jitter); off: the eval transform.
        precision: ``fp32``, ``bf16`` or ``fp16`` autocast (weights, deltas and optimizer state stay fp32).
        seed: seed of shuffling, augmentation and everything random in the loop.

    Raises:
        OptionsError: a value that is not finite or out of range (the flag at fault is named).
    """

    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    optimizer: str = "adamw"
    batch_size: int = 32
    grad_accum: int = 1
    label_smoothing: float = 0.1
    clip_grad: float | None = None
    augment: bool = True
    precision: str = "fp32"
    seed: int = 0

    def __post_init__(self) -> None:
        _choice(self.optimizer, OPTIMIZERS, "optimizer")
        _choice(self.precision, PRECISIONS, "precision")
        # The command line's checks, in its order.
        check_finite(
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_epochs=self.warmup_epochs,
            label_smoothing=self.label_smoothing,
            clip_grad=self.clip_grad,
        )
        if self.lr <= 0:
            raise OptionsError(f"must be positive, got {self.lr:g}", "--lr")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise OptionsError(f"must be positive, got {self.clip_grad:g}", "--clip-grad")
        # Ranges typer enforces before a command runs; the library checks them too.
        if self.epochs < 1:  # the README's promise: no zero-epoch "training" that only evaluates
            raise OptionsError(
                f"must be at least 1, got {self.epochs}; to evaluate a trained delta without training, use fps eval",
                "--epochs",
            )
        at_least = {"batch_size": (self.batch_size, 1), "grad_accum": (self.grad_accum, 1)}
        for name, (value, low) in at_least.items():
            if value < low:
                raise OptionsError(f"must be at least {low}, got {value}", _flag(name))
        for name, value in (("weight_decay", self.weight_decay), ("warmup_epochs", self.warmup_epochs)):
            if value < 0:
                raise OptionsError(f"must not be negative, got {value:g}", _flag(name))
        if not 0 <= self.label_smoothing < 1:
            raise OptionsError(f"must be at least 0 and below 1, got {self.label_smoothing:g}", "--label-smoothing")
