"""Where the activation statistics are gathered: forward hooks that keep per-input sums for FPS.

For a Linear layer the statistic of input feature ``j`` is taken over every token of every sample the layer
sees. For a convolution it is taken per (input channel, kernel position) over the unfolded input patches,
zero padding included, without materialising the unfolded input: the input is summed over the batch first
(sums commute), and the kernel windows of that one-sample-sized sum are a strided view that is reduced in place.

Only these per-input vectors are kept during the pass, never a per-weight tensor, so the memory of a
statistics pass is that of inference.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .constants import NORMS


@dataclass
class InputStats:
    """Running input statistics of one layer.

    Each batch's sums are taken in fp32 and added to fp64 accumulators, so that the result does not depend on
    the order in which batches arrive (one process, or several ranks reduced at the end).

    Attributes:
        abs_sum: sum of ``|x|`` per input position, fp64. ``[in]`` for Linear, ``[in, *kernel]`` for Conv
            (all input channels, not per group).
        sq_sum: sum of ``x**2`` per input position, fp64, same shape.
        count: how many values each position was summed over (tokens for Linear, output positions for Conv).
    """

    abs_sum: Tensor
    sq_sum: Tensor
    count: int

    @classmethod
    def zeros(cls, shape: tuple[int, ...], device: torch.device | str = "cpu") -> InputStats:
        """Empty accumulators (fp64) for a layer whose statistic has ``shape``."""
        return cls(
            torch.zeros(shape, dtype=torch.float64, device=device),
            torch.zeros(shape, dtype=torch.float64, device=device),
            0,
        )

    def statistic(self, norm: str) -> Tensor:
        """The per-input statistic ``a``: mean of ``|x|`` (``l1``) or root mean square (``l2``)."""
        if self.count == 0:
            return torch.zeros_like(self.abs_sum)
        if norm == "l1":
            return self.abs_sum / self.count
        if norm == "l2":
            return (self.sq_sum / self.count).sqrt()
        raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")

    def add(self, abs_sum: Tensor, sq_sum: Tensor, count: int) -> None:
        self.abs_sum += abs_sum
        self.sq_sum += sq_sum
        self.count += count


def _same_padding(size: int, kernel: int, stride: int, dilation: int) -> int:
    return max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)


def _conv_padding(module: nn.Module, x: Tensor) -> list[int]:
    """``F.pad`` amounts (last dim first) that the layer applies to its input."""
    if getattr(module, "_fps_dynamic_same_pad", None) is None:
        # timm's Conv2dSame / Conv2dSameExport pad "same" at run time and store padding 0.
        module._fps_dynamic_same_pad = type(module).__name__.startswith("Conv2dSame")
    if module._fps_dynamic_same_pad:
        pads: list[int] = []
        for size, k, s, d in reversed(
            list(zip(x.shape[2:], module.kernel_size, module.stride, module.dilation, strict=True))
        ):
            total = _same_padding(size, k, s, d)
            pads += [total // 2, total - total // 2]
        return pads
    return list(module._reversed_padding_repeated_twice)


# Rows per chunk are chosen so that a chunk holds at most this many elements: on the CPU the chunk and its two fp32
# temporaries stay in the L2 cache, and on any device no temporary approaches the size of a layer's input.
CHUNK_ELEMENTS = {"cpu": 1 << 18}
DEFAULT_CHUNK_ELEMENTS = 1 << 20


class Scratch:
    """Two reusable chunk-sized fp32 buffers for the element-wise temporaries of the statistics (``|x|``, ``x**2``).

    A fresh temporary per chunk costs page faults on the CPU; one pair of buffers, grown to the largest chunk, does
    not. Hooks run one at a time, so one pair serves them all.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None

    def pair(self, rows: int, cols: int, device: torch.device, both: bool = True) -> tuple[Tensor | None, Tensor]:
        """(an fp32 copy of a chunk, if ``both``; the temporary), each ``[rows, cols]``."""
        n = rows * cols
        b = self._buffer
        if b is None or b.numel() < (1 + both) * n or b.device != device:
            b = self._buffer = torch.empty((1 + both) * n, dtype=torch.float32, device=device)
        return (b[n : 2 * n].view(rows, cols) if both else None), b[:n].view(rows, cols)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the CPU ops inside on the calling thread alone (``torch.set_num_threads(1)``), then restore the count.

    The statistics are many short, memory-bound reductions. Each CPU op over more than ATen's grain of elements is
    an OpenMP parallel region, and on a busy machine every region waits for its slowest thread, possibly
    descheduled: the pass cost twice inference under a load of 7 on 2 cores, with the reductions taking most of
    it. On one thread they never wait, and they were memory-bound anyway (the GEMMs keep all threads).
    """
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _abs_and_square_sums(x: Tensor, scratch: Scratch | None) -> tuple[Tensor, Tensor]:
    """fp32 sums of ``|x|`` and ``x**2`` over the first dimension of ``x``, shaped ``x.shape[1:]``.

    In fp32 whatever the input's dtype, and without a temporary the size of ``x`` (the FPS pass keeps inference's
    peak memory): on CUDA as two fused reductions (``vector_norm``, ord 1 and 2); elsewhere in chunks of rows, on
    one thread (:func:`one_thread`). On the CPU each chunk's column sums are a BLAS matrix-vector product, a third
    faster than ``sum(0)``, and ``x**2`` is taken as ``|x|**2`` in place in the same buffer (the same bits).
    """
    rows = x.reshape(x.shape[0], -1)  # [n, cols], a view of a contiguous input
    if x.device.type == "cuda":
        # Fused: CUDA reductions read bf16 / fp16 and accumulate in fp32 without a cast copy (ATen's
        # make_reduction), and |x| / x**2 are taken inside the kernel; chunks would cost launches here.
        abs_sum = torch.linalg.vector_norm(rows, 1, dim=0, dtype=torch.float32)
        sq_sum = torch.linalg.vector_norm(rows, 2, dim=0, dtype=torch.float32).square()
        return abs_sum.view(x.shape[1:]), sq_sum.view(x.shape[1:])
    n, cols = rows.shape
    budget = CHUNK_ELEMENTS.get(x.device.type, DEFAULT_CHUNK_ELEMENTS)
    # At least four chunks, so that a small input does not get a temporary its own size either.
    step = max(1, min(-(-n // 4), budget // max(cols, 1)))
    scratch = scratch if scratch is not None else Scratch()
    as_fp32, tmp = scratch.pair(step, cols, x.device, x.dtype != torch.float32)
    abs_sum = torch.zeros(cols, dtype=torch.float32, device=x.device)
    sq_sum = torch.zeros(cols, dtype=torch.float32, device=x.device)
    gemv = x.device.type == "cpu"
    ones = torch.ones(step, dtype=torch.float32, device=x.device) if gemv else None
    with one_thread() if gemv else contextlib.nullcontext():
        for start in range(0, n, step):
            chunk = rows[start : start + step]  # [c, cols]
            c = chunk.shape[0]
            if chunk.dtype != torch.float32:  # squares of low-precision inputs are taken in fp32
                chunk = as_fp32[:c].copy_(chunk)
            value = torch.abs(chunk, out=tmp[:c])  # one temporary, reused: each value is reduced before the next
            for total in (abs_sum, sq_sum):
                if gemv:
                    total.addmv_(value.t(), ones[:c])
                else:
                    total += value.sum(0)
                if total is abs_sum:
                    value.mul_(value)  # |x| * |x| == x * x, bit for bit
    return abs_sum.view(x.shape[1:]), sq_sum.view(x.shape[1:])


def linear_input_sums(x: Tensor, scratch: Scratch | None = None) -> tuple[Tensor, Tensor, int]:
    """Sums of ``|x|`` and ``x**2`` over every token of a Linear layer's input ``[..., in]``."""
    rows = x.reshape(-1, x.shape[-1])  # [tokens, in]
    abs_sum, sq_sum = _abs_and_square_sums(rows, scratch)
    return abs_sum, sq_sum, rows.shape[0]


def conv_input_sums(module: nn.Module, x: Tensor, scratch: Scratch | None = None) -> tuple[Tensor, Tensor, int]:
    """Sums of ``|x|`` and ``x**2`` per (input channel, kernel tap) over a conv layer's unfolded input.

    Args:
        module: a ``Conv1d`` or ``Conv2d`` (any stride, padding, padding mode, dilation and groups).
        x: its input, ``[batch, in, *spatial]`` (an unbatched input is treated as a batch of one).
        scratch: reusable buffers for the element-wise temporaries.
    """
    dims = len(module.kernel_size)
    if x.dim() == dims + 1:
        x = x.unsqueeze(0)
    # Sums commute, so reduce the batch first: [in, *spatial]. Padding the batch sums equals summing the padded
    # batch for every padding mode, and |pad(x)| == pad(|x|).
    planes = _abs_and_square_sums(x, scratch)
    pads = _conv_padding(module, x)
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode

    sums = []
    count = 0
    for plane in planes:
        windows = F.pad(plane.unsqueeze(0), pads, mode=mode).squeeze(0) if any(pads) else plane  # [in, *padded]
        for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation, strict=True)):
            windows = windows.unfold(1 + i, d * (k - 1) + 1, s)  # a view: [in, *out_grid, *spans]
        windows = windows[(..., *(slice(None, None, d) for d in module.dilation))]  # [in, *out_grid, *kernel]
        count = x.shape[0] * math.prod(windows.shape[1 : 1 + dims])
        with one_thread() if x.device.type == "cpu" else contextlib.nullcontext():
            sums.append(windows.sum(tuple(range(1, 1 + dims))))  # [in, *kernel]
    return sums[0], sums[1], count


def input_sums(module: nn.Module, x: Tensor, scratch: Scratch | None = None) -> tuple[Tensor, Tensor, int]:
    """Input sums for any candidate layer."""
    if isinstance(module, nn.Linear):
        return linear_input_sums(x, scratch)
    return conv_input_sums(module, x, scratch)


def real_token_inputs(x: Tensor, keep: Tensor | None) -> Tensor | None:
    """A layer input restricted to the real tokens of ``keep`` (``[batch, seq]`` bool, ``None``: all count).

    Returns:
        ``x[keep]`` (``[real tokens, ...]``) when ``x`` is ``[batch, seq, ...]`` aligned with ``keep``; ``x`` itself
        when nothing is padding (``keep`` is ``None``, or ``x`` is ``[batch, dim]``: one vector per sequence, e.g. a
        pooler's); ``None`` when ``x`` does not line up with ``keep`` (the caller decides).
    """
    if keep is None or (x.dim() == 2 and x.shape[0] == keep.shape[0]):
        return x
    if x.dim() < 3 or tuple(x.shape[:2]) != tuple(keep.shape):
        return None
    return x[keep]


@contextlib.contextmanager
def input_stats_hooks(
    modules: Mapping[str, nn.Module], select_tokens: Callable[[str, Tensor], Tensor] | None = None
) -> Iterator[dict[str, InputStats]]:
    """Register forward hooks that accumulate :class:`InputStats` for each module; always remove them.

    Args:
        modules: name -> layer.
        select_tokens: ``(name, input) -> the input's tokens that count``, e.g. a language model's real tokens
            without padding (:func:`fps_cli.indices.select_indices`); default: every token.

    Yields:
        name -> statistics, filled in as the model runs. A module called several times per forward
        accumulates every call; one the forward never reaches keeps a zero statistic (count 0).
    """
    # Every accumulator exists before the first batch: small long-lived tensors allocated between a forward
    # pass's large temporaries fragment the CPU heap and raise peak memory.
    stats = {name: InputStats.zeros(stats_shape(m), m.weight.device) for name, m in modules.items()}
    handles = []
    scratch = Scratch()

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            x = args[0] if select_tokens is None else select_tokens(name, args[0])
            stats[name].add(*input_sums(module, x, scratch))

        return hook

    try:
        for name, module in modules.items():
            handles.append(module.register_forward_hook(make_hook(name)))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


def collect_input_stats(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Tensor],
    *,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, InputStats]:
    """Run ``model`` over ``batches`` once, with no gradients, and return every module's input statistics.

    Statistics stay on ``device`` in fp32; nothing synchronises with the host per batch.

    Args:
        model: the model, already on ``device``.
        modules: name -> layer whose input statistics to gather.
        batches: image batches ``[batch, 3, H, W]`` (moved to ``device`` here).
        device: where the model runs.
        precision: ``fp32``, ``bf16`` or ``fp16`` (autocast for the forward pass only).
        on_batch: called with the batch size after each batch (progress reporting).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    try:
        with input_stats_hooks(modules) as stats, torch.inference_mode(), autocast(device, precision):
            for images in batches:
                model(images.to(device, non_blocking=True))
                if on_batch is not None:
                    on_batch(images.shape[0])
    finally:
        model.train(was_training)
    return stats


def stats_shape(module: nn.Module) -> tuple[int, ...]:
    """Shape of a layer's input statistic: ``[in]`` for Linear, ``[in, *kernel]`` for Conv."""
    if isinstance(module, nn.Linear):
        return (module.in_features,)
    return (module.in_channels, *module.kernel_size)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast for ``bf16`` / ``fp16``; a no-op for ``fp32``."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; expected one of {list(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
