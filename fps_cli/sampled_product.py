"""The delta's gradient on the CPU: the sampled dense-dense product, reading ``dy`` and ``x`` as they come.

For the selected entries ``(i, j)`` of an ``[out, in]`` weight (a CSR pattern: ``crow``, ``cols``), the gradient is
``sum_t dy[t, i] * x[t, j]`` over the tokens ``t``. torch's CPU ``sparse_sampled_addmm`` takes each entry as a dot
product of two contiguous rows over tokens, so it first copies ``dyᵀ`` and ``xᵀ`` (``[out, tokens]``,
``[in, tokens]``) for every layer; at a ViT-B layer's shapes those copies cost several times the product itself
(benchmarks/RESULTS.md, issues 19 and 20). The kernel here (``csrc/sampled_product.c``) walks the tokens in order,
eight at a time, and for each pattern row ``i`` adds ``dy[t, i] * x[t, cols[p]]`` to its entries ``p``: ``dy`` and
``x`` are read row by row, as autograd and the forward left them, and nothing is transposed or copied.

It is compiled at first use with the system's C compiler (``$CC``, else ``cc``, ``gcc`` or ``clang``; about a
tenth of a second), the way torch.compile's CPU backend builds its kernels, into a per-user cache
(``$FPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/fps`` or ``~/.cache/fps``) keyed by the source, the compiler and the
flags, and loaded with ctypes after a check against torch on a small case. Portable flags (``-O2``, no
``-march``) and no floating-point contraction: the same bits on every machine. Where no compiler is found, the
build fails or the check disagrees, fps warns once and uses torch's kernel (slower, same sums up to rounding);
``FPS_SAMPLED_PRODUCT=torch`` chooses torch's kernel without the warning (``fps``, the default, or ``torch``;
any other value raises :class:`~fps_cli.errors.OptionsError`).

ctypes releases the GIL during the call, and the work is split into blocks of pattern rows, one per thread of
``torch.get_num_threads()`` (the threads the user gave torch, so ``--threads`` / ``torch.set_num_threads`` still
bound fps on a shared CPU), run by a small thread pool of this module's own: each entry is summed by one thread in
token order, so the bits do not depend on the thread count, and calls from several threads at once (two models
trained side by side) share nothing but the pool. The pool is rebuilt in a forked child (DataLoader workers),
whose copy of the parent's threads does not run.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import Tensor

from .errors import OptionsError

SOURCE = Path(__file__).resolve().parent / "csrc" / "sampled_product.c"
FLAGS = ("-O2", "-ffp-contract=off", "-shared", "-fPIC")
SYMBOLS = {torch.float32: "fps_accumulate_rows_f32", torch.float64: "fps_accumulate_rows_f64"}

# Below this many multiply-adds per thread (a few ms of work) a second thread costs more than it saves: the
# hand-off, and torch's OpenMP threads still spinning after the last op (measured in a Llama-style step, issue 19).
_MIN_WORK_PER_THREAD = 1 << 23

_build_lock = threading.Lock()
_functions: dict[torch.dtype, object] | None = None
_failure: str | None = None  # why the kernel is not available, once a build was tried
_pool: ThreadPoolExecutor | None = None
_pool_size = 0
_pool_lock = threading.Lock()


class KernelUnavailable(RuntimeError):
    """The kernel could not be built or loaded here (no compiler, a failed build, a failed check)."""


def chosen() -> str:
    """Which kernel ``FPS_SAMPLED_PRODUCT`` asks for: ``"fps"`` (unset or empty: the default) or ``"torch"``.

    Raises:
        OptionsError: any other value (a typo would otherwise pick a kernel silently).
    """
    value = os.environ.get("FPS_SAMPLED_PRODUCT", "").strip().lower() or "fps"
    if value not in ("fps", "torch"):
        raise OptionsError(f"FPS_SAMPLED_PRODUCT={value!r}: expected fps (the default) or torch")
    return value


def enabled() -> bool:
    """Whether this kernel serves the CPU's sampled products (built, and not switched off)."""
    return chosen() == "fps" and _loaded() is not None


def unavailable_reason() -> str | None:
    """Why the kernel is not in use, or ``None`` when it is (builds it if no build was tried yet)."""
    if chosen() == "torch":
        return "FPS_SAMPLED_PRODUCT=torch"
    _loaded()
    return _failure


def _loaded() -> dict[torch.dtype, object] | None:
    global _functions, _failure
    if _functions is None and _failure is None:
        with _build_lock:
            if _functions is None and _failure is None:
                try:
                    _functions = _load_built()
                except KernelUnavailable as error:
                    _failure = str(error)
                    warnings.warn(
                        f"fps: the CPU sampled-product kernel is not available ({_failure}); using torch's "
                        "sparse_sampled_addmm for the delta gradients (same sums, slower). Set "
                        "FPS_SAMPLED_PRODUCT=torch to choose it without this warning.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    return _functions


def _compiler() -> list[str]:
    if os.environ.get("CC"):
        return shlex.split(os.environ["CC"])
    for name in ("cc", "gcc", "clang"):
        found = shutil.which(name)
        if found:
            return [found]
    raise KernelUnavailable("no C compiler found: set $CC, or put cc, gcc or clang on PATH")


def cache_dir() -> Path:
    """Where the built kernel is kept: ``$FPS_CACHE_DIR``, else ``$XDG_CACHE_HOME/fps`` or ``~/.cache/fps``."""
    if os.environ.get("FPS_CACHE_DIR"):
        return Path(os.environ["FPS_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fps"


def build() -> Path:
    """The kernel's shared library, compiled now unless the cache holds this source built by this compiler."""
    if os.name == "nt":
        raise KernelUnavailable("not built on Windows")
    compiler = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(source + repr((compiler, FLAGS, sys.platform, platform.machine())).encode()).hexdigest()
    name = f"sampled_product-{key[:20]}.so"
    try:
        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        if (directory / name).is_file():
            return directory / name
        staging = Path(tempfile.mkdtemp(prefix=".build-", dir=directory))
    except OSError:  # a read-only home: build for this process only
        directory = staging = Path(tempfile.mkdtemp(prefix="fps-kernel-"))
    built = staging / name
    try:
        try:
            result = subprocess.run(
                [*compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as error:
            raise KernelUnavailable(f"{shlex.join(compiler)} could not run: {error}") from None
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise KernelUnavailable(f"{shlex.join(compiler)} failed (exit {result.returncode}): {last}")
        os.replace(built, directory / name)  # atomic: a concurrent process (another rank) sees all of it or none
    except KernelUnavailable:
        shutil.rmtree(staging, ignore_errors=True)  # a failed build leaves nothing behind
        raise
    if staging != directory:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / name


def _load_built() -> dict[torch.dtype, object]:
    """The built kernel's functions; a cached library that does not load or fails its check (a damaged file) is
    built again, once."""
    path = build()
    if path.parent != cache_dir():  # built for this process only: loaded (the mapping stays valid), then removed
        try:
            return _load(path)
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
    try:
        return _load(path)
    except KernelUnavailable:
        path.unlink(missing_ok=True)
        return _load(build())


def _load(path: Path) -> dict[torch.dtype, object]:
    try:
        library = ctypes.CDLL(str(path))
        functions = {dtype: getattr(library, symbol) for dtype, symbol in SYMBOLS.items()}
    except (OSError, AttributeError) as error:
        raise KernelUnavailable(f"{path} could not be loaded: {error}") from None
    for function in functions.values():
        i64, pointer = ctypes.c_int64, ctypes.c_void_p
        function.argtypes = [pointer, i64, pointer, i64, i64, pointer, pointer, pointer, i64, i64]
        function.restype = None
    _check(functions, path)
    return functions


def _check(functions: dict[torch.dtype, object], path: Path) -> None:
    """One small case against torch, in both dtypes (a compiler that builds something else is caught here)."""
    generator = torch.Generator().manual_seed(0)
    crow, cols = torch.tensor([0, 2, 2, 5]), torch.tensor([0, 3, 1, 2, 4])
    for dtype in SYMBOLS:
        dy = torch.randn(11, 3, generator=generator, dtype=torch.float64).to(dtype)
        x = torch.randn(11, 5, generator=generator, dtype=torch.float64).to(dtype)
        out = torch.ones(cols.numel(), dtype=dtype)
        _call(functions[dtype], dy, x, crow, cols, out, 0, 3)
        rows = torch.tensor([0, 0, 2, 2, 2])
        expected = 1 + (dy.double().t() @ x.double())[rows, cols]
        if not torch.allclose(out.double(), expected, rtol=1e-5, atol=1e-5):
            raise KernelUnavailable(f"{path} gives wrong sums ({out.tolist()} vs {expected.tolist()})")


def _call(function, dy: Tensor, x: Tensor, crow: Tensor, cols: Tensor, out: Tensor, first: int, last: int) -> None:
    function(
        dy.data_ptr(), dy.stride(0), x.data_ptr(), x.stride(0), dy.shape[0],
        crow.data_ptr(), cols.data_ptr(), out.data_ptr(), first, last,
    )  # fmt: skip


def _submit(workers: int, calls: list[tuple]) -> list[Future]:
    """Run ``calls`` on the pool, grown to ``workers`` threads if it is smaller. Submitted under the lock, so that
    no thread submits to a pool another has just replaced (a replaced pool finishes what it was given)."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < workers:
            old = _pool
            _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fps-sampled-product")
            _pool_size = workers
            if old is not None:
                old.shutdown(wait=False)
        return [_pool.submit(*call) for call in calls]


def _after_fork_in_child() -> None:
    global _pool, _pool_size, _pool_lock, _build_lock
    # The parent's threads do not run here, and a lock one of them held would never be released.
    _pool, _pool_size, _pool_lock, _build_lock = None, 0, threading.Lock(), threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _rows_major(t: Tensor) -> Tensor:
    """``t`` itself when each row is contiguous (any row stride, a broadcast one included), else a copy."""
    return t if t.stride(1) == 1 or t.shape[1] <= 1 else t.contiguous()


def _check_pattern(crow: Tensor, cols: Tensor, width: int) -> None:
    """The kernel reads through raw pointers: a pattern that would take it outside ``x`` or ``out`` is refused here
    (O(rows + entries), a small fraction of the kernel's entries x tokens)."""
    bad = crow[0] != 0 or crow[-1] != cols.numel() or bool((crow.diff() < 0).any())
    if not bad and cols.numel():
        low, high = torch.aminmax(cols)
        bad = int(low) < 0 or int(high) >= width
    if bad:
        raise ValueError(
            f"the pattern does not fit: crow must rise from 0 to the {cols.numel()} entries, and columns lie in "
            f"[0, {width})"
        )


def accumulate(dy: Tensor, x: Tensor, crow: Tensor, cols: Tensor, out: Tensor) -> None:
    """Add the sampled product of ``dy [tokens, out]`` and ``x [tokens, in]`` at the pattern's entries to ``out``.

    Args:
        dy: output gradient, fp32 or fp64, on the CPU.
        x: layer input, in ``dy``'s dtype.
        crow: CSR row offsets of the pattern (``[out + 1]``).
        cols: CSR column of each entry (``[entries]``), in ``out``'s order.
        out: ``[entries]``, ``dy``'s dtype, contiguous; added to in place.

    Raises:
        KernelUnavailable: the kernel could not be built here (see :func:`enabled`).
    """
    functions = _loaded()
    if functions is None:
        raise KernelUnavailable(_failure or "not built")
    if dy.dtype != x.dtype or dy.dtype != out.dtype or dy.dtype not in SYMBOLS:
        raise TypeError(f"sampled product in {dy.dtype} x {x.dtype} -> {out.dtype}: expected all fp32 or all fp64")
    if not all(t.device.type == "cpu" for t in (dy, x, crow, cols, out)) or not out.is_contiguous():
        raise ValueError("the sampled-product kernel takes CPU tensors and a contiguous out")
    if dy.shape[0] != x.shape[0] or crow.numel() - 1 != dy.shape[1] or cols.numel() != out.numel():
        raise ValueError(f"shapes do not match: dy {tuple(dy.shape)}, x {tuple(x.shape)}, out {tuple(out.shape)}")
    dy, x = _rows_major(dy), _rows_major(x)
    crow, cols = crow.to(torch.int64).contiguous(), cols.to(torch.int64).contiguous()
    _check_pattern(crow, cols, x.shape[1])
    function = functions[dy.dtype]
    rows, entries = crow.numel() - 1, cols.numel()
    threads = max(1, min(torch.get_num_threads(), rows, entries * dy.shape[0] // _MIN_WORK_PER_THREAD))
    if threads == 1:
        _call(function, dy, x, crow, cols, out, 0, rows)
        return
    # Blocks of rows with about equal entries (rows differ in length when the mask is not per neuron).
    targets = torch.arange(1, threads, dtype=torch.int64) * entries // threads
    bounds = [0, *torch.searchsorted(crow, targets).tolist(), rows]
    calls = [(_call, function, dy, x, crow, cols, out, bounds[b], bounds[b + 1]) for b in range(1, threads)]
    futures = _submit(threads - 1, calls)
    try:
        _call(function, dy, x, crow, cols, out, bounds[0], bounds[1])
    finally:
        for future in futures:
            future.result()
