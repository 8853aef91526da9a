"""GPU memory of fps's own code paths, estimated without a GPU: peak live tensor bytes under fake tensors.

Every pass builds the model normally, moves it to fake CPU tensors (``to_empty`` inside
``torch._subclasses.fake_tensor.FakeTensorMode``: shapes and dtypes, no storage) and runs fps's real code under
:class:`LiveMemory`, a small ``TorchDispatchMode`` that adds up the bytes of every tensor storage alive at each op
(parameters, buffers and inputs counted from the start) and keeps the peak. PyTorch's ``MemTracker`` does the same
with per-module attribution, but it registers a gradient hook on every parameter of a module it sees and so fails
on a model with frozen parameters (fps's GPS pass and sparse step: "cannot register a hook on a tensor that
doesn't require gradient"); one counter for every pass keeps the ratios comparable.

Passes (DESIGN.md section 6):

- ``inference``: ``model.eval()``, ``torch.inference_mode``, autocast for bf16: the denominator of the FPS ratio.
- ``fps``: :func:`fps_cli.activations.collect_input_stats` over the candidate layers, one batch.
- ``gps``: :func:`fps_cli.gradients.collect_gradients` (supcon loss, two views per sample, fp64 sums), two batches.
- ``gps_released``: GPS's released loop: every parameter requires grad and the fp32 ``.grad`` accumulates over
  two batches (no fp64 sums to flatter the ratio).
- ``full``: two full fine-tuning steps (AdamW over every parameter; the second one holds the optimizer state).
- ``sparse``: two fps training steps (:func:`fps_cli.sparse.attach` with a neuron-level mask at ``--budget``,
  :func:`fps_cli.finetune.make_optimizer`, as ``fps train`` runs them); ``sparse_dense``: the same on the old
  dense-gradient path.

What the estimate cannot see: CUDA kernels' workspaces (cuBLAS, cuDNN, flash / memory-efficient attention,
cuSPARSE's SDDMM buffer), the caching allocator's rounding and fragmentation, and the CUDA context. Fake CPU
tensors follow fps's CPU branches (e.g. the statistics' chunk size) and CPU autocast's cast policy.

    python benchmarks/memory_estimate.py                        # ViT-B/16, batch 64, fp32 and bf16
    python benchmarks/memory_estimate.py --model test_vit --img-size 32 --batch-size 8 --json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PASSES = ("inference", "fps", "gps", "gps_released", "full", "sparse", "sparse_dense")
MIB = 2**20


class LiveMemory(TorchDispatchMode):
    """Peak bytes of the tensor storages alive under it: those every op creates, plus those passed to ``track``."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, tuple[weakref.ref, int]] = {}

    def _release(self, key: int) -> None:
        _, nbytes = self._live.pop(key, (None, 0))
        self.current -= nbytes

    def track(self, tensors) -> None:
        for t in tree_leaves(tensors):
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue  # a sparse tensor's index and value tensors are counted where they are made
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._live:
                continue
            nbytes = storage.nbytes()
            self._live[key] = (weakref.ref(storage, lambda _, key=key: self._release(key)), nbytes)
            self.current += nbytes
        self.peak = max(self.peak, self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.track(out)
        return out


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="vit_base_patch16_224")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--budget", type=float, default=0.0077)
    p.add_argument("--passes", nargs="+", default=list(PASSES), choices=PASSES)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def _model(args: argparse.Namespace):
    import timm

    kwargs = {"img_size": args.img_size} if args.img_size else {}
    torch.manual_seed(0)
    return timm.create_model(args.model, pretrained=False, num_classes=args.num_classes, **kwargs)


def run_pass(name: str, args: argparse.Namespace, precision: str, mask) -> int:
    """Peak live tensor bytes of one pass, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fps_cli.activations import autocast, collect_input_stats
    from fps_cli.candidates import parameter_roles
    from fps_cli.finetune import TrainConfig, make_optimizer
    from fps_cli.gradients import collect_gradients, gps_loss
    from fps_cli.sparse import attach, recompute_sparse_weights

    model = _model(args)
    roles = parameter_roles(model)
    device = torch.device("cpu")
    size = args.img_size or model.pretrained_cfg.get("input_size", (3, 224, 224))[-1]
    with FakeTensorMode(allow_non_fake_inputs=True) as fake:
        model.to_empty(device=device)
        views = torch.empty(args.batch_size, 2, 3, size, size)
        images = views[:, 0].contiguous() if name not in ("gps", "gps_released") else views
        labels = torch.zeros(args.batch_size, dtype=torch.long)
        indices = {n: fake.from_tensor(i) for n, i in mask.indices.items()} if mask is not None else None
        memory = LiveMemory()
        with memory:
            memory.track([list(model.parameters()), list(model.buffers()), images, labels])
            if name == "inference":
                model.eval()
                with torch.inference_mode(), autocast(device, precision):
                    model(images)
            elif name == "fps":
                collect_input_stats(model, roles.candidates, [images], device=device, precision=precision)
            elif name == "gps":
                weights = {n: m.weight for n, m in roles.candidates.items()}
                collect_gradients(model, weights, [(views, labels)] * 2, device=device, precision=precision)
            elif name == "gps_released":
                model.eval()
                for p in model.parameters():
                    p.requires_grad_(True)
                for _ in range(2):
                    with autocast(device, precision):
                        value = gps_loss(model, views, labels)
                    value.backward()  # .grad (fp32) accumulates, as in GPS's calculate_gradient
            elif name == "full":
                model.train()
                config = TrainConfig()
                optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
                for _ in range(2):
                    with autocast(device, precision):
                        logits = model(images)
                    F.cross_entropy(logits.float(), labels).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            else:
                model.train()
                path = "dense" if name == "sparse_dense" else "sparse"
                sparse = attach(model, indices, mask.fully_trainable, path=path)
                optimizer = make_optimizer(sparse, TrainConfig())
                for _ in range(2):
                    with recompute_sparse_weights(), autocast(device, precision):
                        logits = model(images)
                    F.cross_entropy(logits.float(), labels).backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
    return memory.peak


def estimate(args: argparse.Namespace) -> dict:
    from train_memory import write_mask

    from fps_cli.formats import read_mask

    mask, mask_info = None, None
    if {"sparse", "sparse_dense"} & set(args.passes):
        with tempfile.TemporaryDirectory() as tmp:
            mask_args = argparse.Namespace(model=args.model, num_classes=args.num_classes, budget=args.budget)
            mask_args.img_size = args.img_size
            mask_info = write_mask(mask_args, Path(tmp) / "mask.safetensors")
            mask = read_mask(Path(tmp) / "mask.safetensors")
    report = {"model": args.model, "batch_size": args.batch_size, "budget": args.budget, "mask": mask_info}
    for precision in args.precision:
        started = time.perf_counter()
        peaks = {name: run_pass(name, args, precision, mask) for name in args.passes}
        row = {"peak_bytes": peaks, "seconds": time.perf_counter() - started}
        ratios = {}
        if {"fps", "inference"} <= peaks.keys():
            ratios["fps_over_inference"] = peaks["fps"] / peaks["inference"]
        for gps in ("gps", "gps_released"):
            if {gps, "fps"} <= peaks.keys():
                ratios[f"{gps}_over_fps"] = peaks[gps] / peaks["fps"]
        for sparse in ("sparse", "sparse_dense"):
            if {sparse, "full"} <= peaks.keys():
                ratios[f"{sparse}_over_full"] = peaks[sparse] / peaks["full"]
        row["ratios"] = ratios
        report[precision] = row
    return report


TARGETS = {
    "fps_over_inference": "<= 1.10 (issue 13: <= 1.05)",
    "gps_over_fps": ">= 9",
    "gps_released_over_fps": ">= 9",
    "sparse_over_full": "<= 0.70",
    "sparse_dense_over_full": "(the old dense-gradient path)",
}


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    report = estimate(args)
    if args.json:
        print(json.dumps(report))
        return
    print(f"{args.model}, batch {args.batch_size}: peak live tensor memory on fake tensors (MiB)")
    for precision in args.precision:
        row = report[precision]
        print(f"  {precision} ({row['seconds']:.0f} s)")
        for name, peak in row["peak_bytes"].items():
            print(f"    {name:13s} {peak / MIB:10.1f}")
        for name, ratio in row["ratios"].items():
            print(f"    {name:24s} {ratio:6.3f}  target {TARGETS[name]}")


if __name__ == "__main__":
    main()
