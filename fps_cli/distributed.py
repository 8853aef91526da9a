"""Several processes under torchrun (DESIGN.md section 5): process group, data sharding, reductions.

One process is the default; under ``torchrun --nproc-per-node N -m fps_cli ...`` (``WORLD_SIZE`` > 1 in the
environment) each rank takes every N-th *batch* of the data, gathers its statistics, and one all-reduce sums
them before selection. Sharding whole batches keeps each batch's composition the same at any world size, and
statistics accumulate across batches in fp64, so the mask is the same as the single-process mask.
Only rank 0 writes files and prints. NCCL on GPUs, gloo on the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from .activations import InputStats


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env() -> Dist:
    """Read torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (a single process when unset)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(dist: Dist, device: torch.device) -> torch.device:
    """Join the process group when running under torchrun; returns the device this rank should use.

    With ``--device cuda`` (or ``auto`` on a GPU machine) each rank takes ``cuda:LOCAL_RANK``.
    """
    if not dist.enabled:
        return device
    import torch.distributed as td

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def shutdown() -> None:
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.destroy_process_group()


def batch_shard(num_samples: int, batch_size: int, dist: Dist) -> list[list[int]]:
    """The batches (lists of sample indices) this rank processes: every ``world_size``-th batch of the data.

    Every sample is in exactly one batch of exactly one rank, the last partial batch included.
    """
    batches = [list(range(i, min(i + batch_size, num_samples))) for i in range(0, num_samples, batch_size)]
    return batches[dist.rank :: dist.world_size]


def all_reduce(tensors: list[torch.Tensor]) -> None:
    """Sum tensors across ranks in place (a no-op in a single process)."""
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()):
        return
    # Statistics gathered under inference_mode are inference tensors: update them in that mode.
    with torch.inference_mode():
        for t in tensors:
            td.all_reduce(t, op=td.ReduceOp.SUM)


def sum_over_ranks(values: list[int], device: torch.device) -> list[int]:
    """Integers summed over all ranks (exact below 2**53)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce([t])
    return [int(v) for v in t.tolist()]


def reduce_input_stats(stats: Mapping[str, InputStats], device: torch.device) -> None:
    """Sum every layer's input statistics over all ranks, in place."""
    all_reduce([t for s in stats.values() for t in (s.abs_sum, s.sq_sum)])
    counts = sum_over_ranks([s.count for s in stats.values()], device)
    for s, count in zip(stats.values(), counts, strict=True):
        s.count = count


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """Average the gradients of ``params`` over ranks with one flat all-reduce.

    Training is data-parallel over the trainable tensors only (deltas, head, biases: about 1% of a model), so one
    flattened buffer costs less than DDP's per-bucket machinery and keeps the frozen base out of it entirely.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    all_reduce([flat])
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def sum_floats(values: list[float], device: torch.device) -> list[float]:
    """Floats summed over all ranks, in fp64."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    all_reduce([t])
    return t.tolist()
