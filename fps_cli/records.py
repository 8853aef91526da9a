"""Run records a timm user knows, fed by training's events: ``summary.csv``, ``args.yaml`` and wandb.

timm's ``train.py`` writes ``args.yaml`` (the resolved arguments) and ``summary.csv`` (one row per epoch, columns
``epoch, train_loss, eval_loss, eval_top1, eval_top5, lr``; see ``timm.utils.summary.update_summary``) into its
output folder, and logs the same rows to wandb with ``--log-wandb``. ``fps train`` writes them beside the delta,
named after it (``delta.summary.csv``, ``delta.args.yaml``, as ``delta.metrics.jsonl``), with fps's own columns
after timm's. Epochs count from 1, as in fps's log. The files are written by :class:`fps_cli.finetune.RunFiles`
with the checkpoint and the metrics log, as one unit (:mod:`.outputs`); this module only renders them. A resumed run
never reads ``summary.csv`` back: its rows are rebuilt from the checkpoint's history of epochs (the same records
the rows were made from), so a hand-edited or damaged file is simply rewritten as an uninterrupted run writes it.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Mapping
from typing import Any

from .errors import FpsError

# timm's columns, in timm's order; eval_* only with a validation split, eval_top5 only with 5 classes or more.
TIMM_COLUMNS = ("epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr")
# fps's own, after timm's.
FPS_COLUMNS = ("train_top1", "step", "seconds")
WANDB_EXTRA = "pip install 'fps-cli[wandb]'"


def summary_row(event: Mapping[str, Any]) -> dict[str, Any]:
    """The ``summary.csv`` row of one ``epoch`` event of :func:`fps_cli.finetune.run_train`."""
    names = {"val_loss": "eval_loss", "val_top1": "eval_top1", "val_top5": "eval_top5"}
    values = {names.get(k, k): v for k, v in event.items()}
    return {c: values[c] for c in (*TIMM_COLUMNS, *FPS_COLUMNS) if c in values}


def summary_csv(rows: list[Mapping[str, Any]]) -> str:
    """``summary.csv``'s text: a header of the first row's columns, then one line per epoch."""
    if not rows:
        return ""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def args_yaml(args: Mapping[str, Any]) -> str:
    """The resolved arguments as YAML, keys in the command's order (timm: ``yaml.safe_dump(vars(args))``)."""
    import yaml  # a dependency of timm

    plain = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in args.items()}
    return yaml.safe_dump(plain, default_flow_style=False, sort_keys=False)


def require_wandb() -> None:
    """Raises:
    FpsError: the ``wandb`` package is not installed (checked before training starts)."""
    try:
        import wandb  # noqa: F401
    except ImportError:
        raise FpsError(f"--log-wandb needs the wandb package: {WANDB_EXTRA}") from None


class WandbLog:
    """Logs every epoch's summary row to a wandb run, as timm's ``update_summary(..., log_wandb=True)`` does.

    The run's project is ``$WANDB_PROJECT`` (default ``fps``); ``WANDB_MODE=offline`` or ``disabled`` work as in
    wandb. The resolved arguments are the run's config.
    """

    def __init__(self, config: Mapping[str, Any], *, name: str) -> None:
        require_wandb()
        import wandb

        plain = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in config.items()}
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fps"), name=name, config=plain)

    def __call__(self, event: Mapping[str, Any]) -> None:
        if event.get("event") == "epoch":
            self.run.log(summary_row(event))

    def finish(self) -> None:
        self.run.finish()
