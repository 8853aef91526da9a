"""The sparse path's building blocks at one ViT-B layer's shapes on the CPU: why sampled_addmm, why the overlay.

One qkv-sized layer (``--tokens`` = batch 16 x 197 tokens, 768 -> 2304, ``--per-row`` selected entries per output
row, random columns). Each figure is the minimum over ``--repeats`` calls (a shared machine: the minimum is the
figure least disturbed by other processes), in milliseconds, and as a fraction of one dense GEMM of the layer.

- dense GEMMs: the forward ``x @ Wᵀ``, the input gradient ``dy @ W`` and the weight gradient ``dyᵀ @ x`` (the one
  the sparse path replaces).
- the delta's gradient at the selected entries: ``torch.sparse.sampled_addmm`` over the CSR pattern (dyᵀ
  contiguous, or a strided view), the same sums as an index-gather product chunked over tokens (an ``einsum``
  formulation), or a batched matmul over gathered rows, fps's CPU kernel (:mod:`fps_cli.sampled_product`: ``dy``
  and ``x`` read row-major, no transposes), and :meth:`SparseAdd.sampled_grad` as used, with fps's kernel and with
  torch's (``FPS_SAMPLED_PRODUCT=torch``).
- the delta's contribution to the forward and the input gradient, were it computed apart from the base
  (``x · Sᵀ``, ``dy · S`` with ``S`` in CSR), against the overlay fps uses instead (write the effective entries
  into the base and restore them: O(selected)).

    python benchmarks/sparse_ops.py
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16 * 197)
    p.add_argument("--in-features", type=int, default=768)
    p.add_argument("--out-features", type=int, default=2304)
    p.add_argument("--per-row", type=int, default=6)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

    from fps_cli import sampled_product
    from fps_cli.sparse import SparseAdd

    torch.manual_seed(0)
    tokens, fan_in, fan_out, k = args.tokens, args.in_features, args.out_features, args.per_row
    x, dy, weight = torch.randn(tokens, fan_in), torch.randn(tokens, fan_out), torch.randn(fan_out, fan_in)
    cols = torch.stack([torch.randperm(fan_in)[:k].sort().values for _ in range(fan_out)])  # [out, k]
    index = (torch.arange(fan_out)[:, None] * fan_in + cols).reshape(-1)
    owner = SparseAdd(index, torch.randn(index.numel()))
    owner.build_pattern(weight.shape)
    rows, flat_cols = owner.rows, owner.cols
    pattern = torch.sparse_csr_tensor(
        owner.crow, flat_cols, torch.zeros(index.numel()), weight.shape, check_invariants=False
    )
    delta_csr = torch.sparse_csr_tensor(
        owner.crow, flat_cols, owner.delta.detach(), weight.shape, check_invariants=False
    )
    delta_t_csr = delta_csr.to_dense().t().to_sparse_csr()  # built once, like the pattern
    dy_t, x_t = dy.t().contiguous(), x.t().contiguous()
    expected = (dy.t() @ x).reshape(-1)[index]

    def gather_chunked(chunk: int = 256) -> torch.Tensor:
        out = torch.zeros(index.numel())
        for s in range(0, tokens, chunk):
            out += torch.einsum(
                "tk,tk->k", dy[s : s + chunk].index_select(1, rows), x[s : s + chunk].index_select(1, flat_cols)
            )
        return out

    def bmm_gather() -> torch.Tensor:
        return torch.bmm(x_t.index_select(0, flat_cols).view(fan_out, k, tokens), dy_t.unsqueeze(-1)).reshape(-1)

    def kernel() -> torch.Tensor:
        out = torch.zeros(index.numel())
        sampled_product.accumulate(dy, x, owner.crow, flat_cols, out)
        return out

    def sampled_grad_torch_kernel() -> torch.Tensor:
        os.environ["FPS_SAMPLED_PRODUCT"] = "torch"
        try:
            return owner.sampled_grad(dy, x)
        finally:
            del os.environ["FPS_SAMPLED_PRODUCT"]

    def overlay() -> None:
        with owner.effective(weight):
            pass

    for name, fn in (
        ("gather_chunked", gather_chunked),
        ("bmm_gather", bmm_gather),
        ("sampled_grad", lambda: owner.sampled_grad(dy, x)),
        ("kernel", kernel),
        ("sampled_grad_torch_kernel", sampled_grad_torch_kernel),
    ):
        torch.testing.assert_close(fn(), expected, rtol=1e-4, atol=1e-3, msg=name)

    rows_out = [
        ("dense forward GEMM x @ Wᵀ", lambda: x @ weight.t()),
        ("dense input gradient dy @ W", lambda: dy @ weight),
        ("dense weight gradient dyᵀ @ x", lambda: dy.t() @ x),
        ("sampled_addmm, dyᵀ contiguous", lambda: torch.sparse.sampled_addmm(pattern, dy_t, x, beta=0.0)),
        ("sampled_addmm, dyᵀ strided view", lambda: torch.sparse.sampled_addmm(pattern, dy.t(), x, beta=0.0)),
        ("dyᵀ contiguous copy", lambda: dy.t().contiguous()),
        ("index-gather einsum, 256 tokens/chunk", gather_chunked),
        ("bmm over gathered rows", bmm_gather),
        ("fps CPU kernel (dy, x row-major)", kernel),
        ("fps SparseAdd.sampled_grad (as used)", lambda: owner.sampled_grad(dy, x)),
        ("sampled_grad with torch's kernel", sampled_grad_torch_kernel),
        ("x · Sᵀ as (S @ xᵀ)ᵀ, S in CSR", lambda: (delta_csr @ x.t()).t()),
        ("x · Sᵀ as x @ (Sᵀ in CSR)", lambda: x @ delta_t_csr),
        ("dy · S as (Sᵀ @ dyᵀ)ᵀ, Sᵀ in CSR", lambda: (delta_t_csr @ dy.t()).t()),
        ("overlay: write and restore the entries", overlay),
    ]
    results = [(name, best(fn, args.repeats)) for name, fn in rows_out]
    gemm = results[0][1]
    print(
        f"{tokens} tokens, {fan_in} -> {fan_out}, {k} per row ({index.numel():,} entries), "
        f"{torch.get_num_threads()} threads, min of {args.repeats}; fps's CPU kernel: "
        f"{sampled_product.unavailable_reason() or 'in use'}"
    )
    for name, seconds in results:
        print(f"  {name:42s} {seconds * 1000:9.2f} ms  {seconds / gemm:6.3f} of the forward GEMM")


if __name__ == "__main__":
    main()
