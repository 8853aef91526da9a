"""The loader shared by the token tasks: a dataset tokenized once in the main process, batched by a collate."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


def token_loader(
    dataset: Dataset,
    collate: Callable,
    *,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    batches: list[list[int]] | None = None,
    sampler: Sampler | None = None,
    pin_memory: bool = False,
) -> DataLoader:
    """``batches`` (a rank's shard of fixed batches) wins over ``sampler``, which wins over a seeded shuffle; no
    workers: the examples are already tokens."""
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, collate_fn=collate, pin_memory=pin_memory)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=collate,
        pin_memory=pin_memory,
    )
