"""The CPU's sampled product (fps_cli/sampled_product.py): exact sums, any pattern, any thread count, any thread;
built once per source and compiler; torch's kernel, with one warning, where it cannot be built."""

import multiprocessing
import shutil
import tempfile
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from fps_cli import sampled_product, sparse
from fps_cli.errors import OptionsError


def _has_compiler() -> bool:
    try:
        return bool(sampled_product._compiler())
    except sampled_product.KernelUnavailable:
        return False


# The kernel needs a C compiler (CI has one). Without one these tests cannot run, and the fallback tests below cover
# what fps then does; with one, a kernel that fails to build or to pass its check fails them.
needs_kernel = pytest.mark.skipif(not _has_compiler(), reason="no C compiler here")


@needs_kernel
def test_the_kernel_is_built_and_used_where_a_compiler_is():
    assert sampled_product.unavailable_reason() is None and sampled_product.enabled()


def _pattern(rows: int, cols: int, lengths: list[int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    picked = [torch.randperm(cols, generator=g)[:n].sort().values for n in lengths]
    crow = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    return crow, torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


def _expected(dy, x, crow, cols):
    rows = torch.repeat_interleave(torch.arange(crow.numel() - 1), crow.diff())
    return (dy.double().t() @ x.double())[rows, cols]


@needs_kernel
@pytest.mark.parametrize("tokens", [0, 1, 7, 8, 9, 61])  # below, at and past the eight-token passes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_sums_at_the_selected_entries_for_any_token_count(tokens, dtype):
    lengths = [3, 0, 5, 1, 0, 7]  # uneven rows, empty rows (a mask that is not per neuron)
    crow, cols = _pattern(6, 11, lengths)
    dy, x = torch.randn(tokens, 6, dtype=dtype), torch.randn(tokens, 11, dtype=dtype)
    out = torch.full((cols.numel(),), 0.5, dtype=dtype)
    sampled_product.accumulate(dy, x, crow, cols, out)
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    torch.testing.assert_close(out.double(), _expected(dy, x, crow, cols) + 0.5, **tolerance)  # added to out


@needs_kernel
def test_the_bits_do_not_depend_on_the_thread_count(monkeypatch):
    crow, cols = _pattern(40, 30, [i % 5 for i in range(40)], seed=1)
    dy, x = torch.randn(203, 40), torch.randn(203, 30)
    results = []
    monkeypatch.setattr(sampled_product, "_MIN_WORK_PER_THREAD", 1)  # split however small the work
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3, 5):
            torch.set_num_threads(n)
            out = torch.zeros(cols.numel())
            sampled_product.accumulate(dy, x, crow, cols, out)
            results.append(out)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(r, results[0]) for r in results)
    torch.testing.assert_close(results[0].double(), _expected(dy, x, crow, cols), rtol=1e-5, atol=1e-5)


@needs_kernel
def test_strided_inputs_and_refused_dtypes():
    crow, cols = _pattern(4, 6, [2, 2, 2, 2])
    dy, x = torch.randn(16, 8)[:, ::2], torch.randn(6, 16).t()  # neither is row-major contiguous
    out = torch.zeros(cols.numel())
    sampled_product.accumulate(dy, x, crow, cols, out)
    torch.testing.assert_close(out.double(), _expected(dy, x, crow, cols), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="bfloat16"):
        sampled_product.accumulate(dy.bfloat16(), x.bfloat16(), crow, cols, out.bfloat16())
    # A pattern pointing outside x (or past its own entries) never reaches the kernel's raw pointers.
    with pytest.raises(ValueError, match="the pattern does not fit"):
        sampled_product.accumulate(dy, x, crow, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7]), out)  # column 6 of 6
    with pytest.raises(ValueError, match="the pattern does not fit"):
        sampled_product.accumulate(dy, x, torch.tensor([0, 2, 4, 6, 9]), cols, out)
    with pytest.raises(ValueError, match="the pattern does not fit"):
        sampled_product.accumulate(dy, x, torch.tensor([0, 7, 4, 6, 8]), cols, out)  # row 0 would run past out


@needs_kernel
def test_several_threads_may_call_it_at_once(monkeypatch):
    """Two models trained side by side: no shared state but the pool, whose blocks never overlap."""
    monkeypatch.setattr(sampled_product, "_MIN_WORK_PER_THREAD", 1)
    crow, cols = _pattern(64, 48, [4] * 64, seed=2)
    cases = [(torch.randn(301, 64), torch.randn(301, 48)) for _ in range(6)]
    outs = [torch.zeros(cols.numel()) for _ in cases]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                outs[i].zero_()
                sampled_product.accumulate(*cases[i], crow, cols, outs[i])
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(len(cases))]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors
    for (dy, x), out in zip(cases, outs, strict=True):
        torch.testing.assert_close(out.double(), _expected(dy, x, crow, cols), rtol=1e-5, atol=1e-5)


def test_a_pool_replaced_by_a_larger_one_finishes_what_it_was_given(monkeypatch):
    """One thread's call still running on the pool while another's needs more threads (torch.set_num_threads
    raised in between): the new pool takes the new calls, the old one finishes its own."""
    monkeypatch.setattr(sampled_product, "_pool", None)
    monkeypatch.setattr(sampled_product, "_pool_size", 0)
    gate = threading.Event()
    first = sampled_product._submit(1, [(gate.wait, 10)])
    second = sampled_product._submit(3, [(int, "7")] * 3)
    assert [f.result(timeout=10) for f in second] == [7, 7, 7]
    gate.set()
    assert first[0].result(timeout=10) is True


def _in_child(queue):
    crow, cols = _pattern(8, 8, [2] * 8)
    dy, x = torch.ones(16, 8), torch.ones(16, 8)
    out = torch.zeros(cols.numel())
    sampled_product.accumulate(dy, x, crow, cols, out)
    queue.put(out.tolist())


@needs_kernel
def test_a_forked_child_gets_its_own_pool(monkeypatch):
    """A DataLoader worker (fork) inherits the pool object but not its threads: it must build its own."""
    monkeypatch.setattr(sampled_product, "_MIN_WORK_PER_THREAD", 1)
    _in_child(multiprocessing.Queue())  # the parent's pool exists before the fork
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_in_child, args=(queue,))
    child.start()
    result = queue.get(timeout=60)
    child.join(timeout=60)
    assert child.exitcode == 0 and result == [16.0] * 16


@needs_kernel
def test_the_sparse_path_runs_it_and_agrees_with_torchs_kernel(monkeypatch):
    """A training step's delta gradients through this kernel, and with FPS_SAMPLED_PRODUCT=torch (torch's
    sparse_sampled_addmm), match the dense path's gathered gradient."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 24), nn.GELU(), nn.Linear(24, 5)).double()
    indices = {"0.weight": torch.randperm(12 * 24)[:40].sort().values, "2.weight": torch.arange(0, 120, 7)}
    x = torch.randn(3, 9, 12, dtype=torch.float64)
    calls = []
    accumulate = sampled_product.accumulate
    monkeypatch.setattr(sampled_product, "accumulate", lambda *a: calls.append(1) or accumulate(*a))
    grads = {}
    for kernel in ("fps", "torch", "dense"):
        if kernel == "torch":
            monkeypatch.setenv("FPS_SAMPLED_PRODUCT", "torch")
        calls.clear()
        params = sparse.attach(model, indices, [], path="sparse" if kernel != "dense" else "dense")
        with sparse.recompute_sparse_weights():
            model(x).square().sum().backward()
        grads[kernel] = {n: d.delta.grad.clone() for n, d in params.deltas.items()}
        assert len(calls) == (2 if kernel == "fps" else 0), kernel
        sparse.detach(model, params)
    for kernel in ("fps", "torch"):
        for name, grad in grads["dense"].items():
            torch.testing.assert_close(grads[kernel][name], grad, rtol=1e-12, atol=1e-12, msg=f"{kernel} {name}")


@pytest.fixture
def unbuilt(monkeypatch, tmp_path):
    """The module as before its first use, with its own cache directory."""
    monkeypatch.setattr(sampled_product, "_functions", None)
    monkeypatch.setattr(sampled_product, "_failure", None)
    monkeypatch.setenv("FPS_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("FPS_SAMPLED_PRODUCT", raising=False)
    return tmp_path / "cache"


@pytest.mark.parametrize(
    "compiler, reason",
    [("/nonexistent/cc", "/nonexistent/cc could not run"), ("false", "false failed (exit 1)")],
)
def test_without_a_compiler_torchs_kernel_trains_after_one_warning(unbuilt, monkeypatch, compiler, reason):
    monkeypatch.setenv("CC", compiler)
    with pytest.warns(RuntimeWarning, match="kernel is not available") as caught:
        assert not sampled_product.enabled()
        assert not sampled_product.enabled()  # tried once, warned once
    assert len(caught) == 1 and reason in str(caught[0].message)
    assert not unbuilt.exists() or not any(unbuilt.iterdir())  # a failed build leaves nothing in the cache
    assert reason in sampled_product.unavailable_reason()
    with pytest.raises(sampled_product.KernelUnavailable, match=reason.split()[0]):
        sampled_product.accumulate(
            torch.zeros(1, 1), torch.zeros(1, 1), torch.tensor([0, 0]), torch.tensor([]), torch.zeros(0)
        )
    # The sparse path still gives the dense path's gradients, through torch's sparse_sampled_addmm.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    indices = {"0.weight": torch.arange(0, 48, 5), "2.weight": torch.tensor([0, 4, 23])}
    x = torch.randn(4, 6, dtype=torch.float64)
    grads = {}
    for path in ("sparse", "dense"):
        params = sparse.attach(model, indices, [], path=path)
        with sparse.recompute_sparse_weights():
            model(x).square().sum().backward()
        grads[path] = {n: d.delta.grad.clone() for n, d in params.deltas.items()}
        sparse.detach(model, params)
    for name, grad in grads["dense"].items():
        torch.testing.assert_close(grads["sparse"][name], grad, rtol=1e-12, atol=1e-12, msg=name)


def test_torch_chosen_by_name_gives_no_warning(unbuilt, monkeypatch):
    monkeypatch.setenv("FPS_SAMPLED_PRODUCT", "torch")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not sampled_product.enabled()
    assert sampled_product.unavailable_reason() == "FPS_SAMPLED_PRODUCT=torch"
    monkeypatch.setenv("FPS_SAMPLED_PRODUCT", " Torch ")
    assert sampled_product.chosen() == "torch"
    monkeypatch.setenv("FPS_SAMPLED_PRODUCT", "")
    assert sampled_product.chosen() == "fps"
    monkeypatch.setenv("FPS_SAMPLED_PRODUCT", "numba")
    with pytest.raises(OptionsError, match="FPS_SAMPLED_PRODUCT='numba': expected fps"):
        sampled_product.enabled()


@needs_kernel
def test_built_once_per_source_and_compiler(unbuilt, monkeypatch):
    first = sampled_product.build()
    assert first.parent == unbuilt and first.is_file() and not list(unbuilt.glob(".build-*"))  # no leftovers
    real_run = sampled_product.subprocess.run
    monkeypatch.setattr(sampled_product.subprocess, "run", lambda *a, **k: pytest.fail("compiled twice"))
    assert sampled_product.build() == first  # from the cache
    monkeypatch.setattr(sampled_product.subprocess, "run", real_run)
    monkeypatch.setattr(sampled_product, "FLAGS", (*sampled_product.FLAGS, "-O1"))
    assert sampled_product.build() != first  # other flags, another library


@needs_kernel
def test_a_damaged_cached_library_is_built_again(unbuilt):
    cached = sampled_product.build()
    cached.write_bytes(b"not a shared library")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning: the kernel is rebuilt and used
        assert sampled_product.enabled()
    assert cached.read_bytes().startswith(b"\x7fELF") or cached.stat().st_size > 1000


@needs_kernel
def test_an_unwritable_cache_builds_for_this_process(unbuilt, monkeypatch, tmp_path):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("FPS_CACHE_DIR", str(tmp_path / "file" / "cache"))  # under a file: cannot be created
    built = sampled_product.build()
    assert built.is_file() and "fps-kernel-" in built.parent.name
    shutil.rmtree(built.parent)
    before = set(Path(tempfile.gettempdir()).glob("fps-kernel-*"))
    assert sampled_product.enabled()
    assert set(Path(tempfile.gettempdir()).glob("fps-kernel-*")) == before  # removed once loaded


def test_a_library_that_computes_something_else_is_refused(tmp_path):
    def nothing(*args):
        return None

    with pytest.raises(sampled_product.KernelUnavailable, match="wrong sums"):
        sampled_product._check({torch.float32: nothing, torch.float64: nothing}, tmp_path / "bad.so")
