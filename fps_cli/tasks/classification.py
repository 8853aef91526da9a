"""What image and text classification share: cross-entropy, top-1 / top-5 and their sums over batches."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

Batch = dict[str, Any]


def loss(logits: Tensor, batch: Batch, criterion: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """The training loss: ``criterion`` (label-smoothed cross-entropy) of the fp32 logits."""
    return criterion(logits.float(), batch["labels"])


def count(batch: Batch) -> int:
    """Examples in the batch."""
    return batch["labels"].numel()


def hits(logits: Tensor, batch: Batch) -> Tensor:
    """Top-1 right answers in the batch (a device tensor: no host synchronisation)."""
    return logits.detach().argmax(dim=1).eq(batch["labels"]).sum()


def eval_sums(logits: Tensor, batch: Batch) -> dict[str, Tensor]:
    """Summed cross-entropy, top-1 and top-5 hits and examples of one batch (top-5: top-k with k = min(5, classes))."""
    labels = batch["labels"]
    logits = logits.float()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices  # [B, k]
    hit = top.eq(labels[:, None])
    return {
        "loss": F.cross_entropy(logits, labels, reduction="sum").double(),
        "correct1": hit[:, 0].sum(),
        "correct5": hit.any(dim=1).sum(),
        "samples": torch.tensor(labels.numel(), device=labels.device),
    }


def summarize(sums: Mapping[str, float], num_classes: int) -> dict[str, Any]:
    """Top-1 (and top-5 with at least 5 classes) accuracy in percent, and mean cross-entropy."""
    seen = int(sums.get("samples", 0))
    if seen == 0:
        return {"samples": 0}
    metrics = {"top1": 100.0 * int(sums["correct1"]) / seen, "loss": float(sums["loss"]) / seen, "samples": seen}
    if num_classes >= 5:
        metrics["top5"] = 100.0 * int(sums["correct5"]) / seen
    return metrics
