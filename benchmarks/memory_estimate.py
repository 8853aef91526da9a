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

**Language models** (``--model llama-3.2-3b``, ``llama-3-8b``, ``tiny-llama``: the published shapes are written
below, :data:`LLM_SHAPES`, and the model is built from its ``LlamaConfig`` alone on the meta device, then
``to_empty`` on fake tensors; no weights are read). The setting is PEFT's MetaMathQA benchmark
(``method_comparison/MetaMathQA``: the model in bf16, ``use_amp`` off, max length 768, batch 4, AdamW, lr 1e-4,
weight decay 0.1), without and with gradient checkpointing (transformers' non-reentrant one), two steps each; the loss
is transformers' own (``labels``: the logits upcast to fp32 as it does):

- ``inference``: ``model(input_ids, attention_mask)`` under ``torch.inference_mode`` (every position's logits).
- ``fps``: fps's selection pass on the same batch (:func:`fps_cli.tasks.causal_lm.statistics_forward` hooks on every
  candidate Linear of the decoder, statistics over the attention mask's tokens).
- ``full``: every parameter trained, AdamW states in bf16 (the parameters' dtype), as PEFT's benchmark does.
- ``lora``: PEFT LoRA r=32, alpha 64, on q_proj / v_proj (PEFT's defaults for Llama): the adapter in fp32.
- ``shira``: PEFT SHiRA at the same trainable count (``r=32`` on q_proj / v_proj: SHiRA sizes a layer as LoRA does).
- ``sparse``: fps's sparse path (:func:`fps_cli.sparse.attach`) on every Linear of the decoder (q, k, v, o, gate, up,
  down; not ``lm_head``, tied or not), neuron-level, exactly as many entries as LoRA's trainable count, the deltas
  and their AdamW state in fp32, the base in bf16; the loss as ``fps train`` computes it (the causal-LM task's
  forward and loss: the logits made a chunk of tokens at a time, :mod:`fps_cli.tasks.next_token`).
- ``sparse_hf_loss``: the same sparse path with transformers' own loss (the whole logits, as ``full``, ``lora`` and
  ``shira`` have them): what the sparse path alone costs.

What the estimate cannot see: CUDA kernels' workspaces (cuBLAS, cuDNN, flash / memory-efficient attention,
cuSPARSE's SDDMM buffer), the caching allocator's rounding and fragmentation, and the CUDA context. Fake CPU
tensors follow fps's CPU branches (e.g. the statistics' chunk size) and CPU autocast's cast policy.

    python benchmarks/memory_estimate.py                        # ViT-B/16, batch 64, fp32 and bf16
    python benchmarks/memory_estimate.py --model test_vit --img-size 32 --batch-size 8 --json
    python benchmarks/memory_estimate.py --model llama-3.2-3b                # PEFT's MetaMathQA setting, +checkpointing
    python benchmarks/memory_estimate.py --model llama-3-8b --passes lora sparse
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import sys
import tempfile
import time
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

PASSES = ("inference", "fps", "gps", "gps_released", "full", "sparse", "sparse_dense")
MIB = 2**20

# Published shapes (the models' config.json on the hub), written here so that nothing is downloaded. RoPE scaling and
# the context length change no tensor of a step at length 768, so they are left at LlamaConfig's defaults.
LLM_SHAPES = {
    "llama-3.2-3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=128256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    ),
    # For tests: the same architecture at toy size.
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=512,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    ),
}
LLM_PASSES = ("inference", "inference_last", "fps", "full", "lora", "shira", "sparse", "sparse_hf_loss")
# PEFT's method_comparison/MetaMathQA results for Llama-3.2-3B on an L40S (GB, as its result files report them).
PEFT_MEASURED_GB = {"full": 38.9, "lora": 22.3, "shira": 21.7}
LORA_TARGETS = ("q_proj", "v_proj")


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
    p.add_argument("--model", default="vit_base_patch16_224", help=f"a timm name, or one of {', '.join(LLM_SHAPES)}")
    p.add_argument("--img-size", type=int, default=None, help="default: the model's")
    p.add_argument("--num-classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: 64 (vision), 4 (language models)")
    p.add_argument("--seq-len", type=int, default=768, help="language models: tokens per sequence")
    p.add_argument("--lora-r", type=int, default=32, help="language models: LoRA's r, which sets every count")
    p.add_argument(
        "--checkpointing",
        nargs="+",
        default=["off", "on"],
        choices=("off", "on"),
        help="language models: without and/or with gradient checkpointing",
    )
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=("fp32", "bf16"))
    p.add_argument("--budget", type=float, default=0.0077)
    p.add_argument("--passes", nargs="+", default=None, choices=sorted({*PASSES, *LLM_PASSES}))
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    llm = args.model in LLM_SHAPES
    if args.batch_size is None:
        args.batch_size = 4 if llm else 64
    if args.passes is None:
        args.passes = list(LLM_PASSES if llm else PASSES)
    wrong = [n for n in args.passes if n not in (LLM_PASSES if llm else PASSES)]
    if wrong:
        p.error(f"--passes {' '.join(wrong)} not available for {args.model}")
    return args


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


# --------------------------------------------------------------------------------------------- language models


def llm_config(name: str):
    """The ``LlamaConfig`` of a published shape, bf16, sdpa attention (what PEFT's benchmark gets by default)."""
    from transformers import LlamaConfig

    config = LlamaConfig(**LLM_SHAPES[name], dtype="bfloat16")
    config._attn_implementation = "sdpa"
    return config


def decoder_linears(model) -> dict:
    """fps's candidates in a causal LM: every ``nn.Linear`` of the decoder (``lm_head`` left out, tied or not)."""
    decoder = model.get_decoder()
    return {f"{model.base_model_prefix}.{n}": m for n, m in decoder.named_modules() if type(m) is torch.nn.Linear}


def lora_count(model, r: int) -> int:
    """LoRA's trainable count on q_proj / v_proj: ``r * (in + out)`` per layer."""
    return sum(
        r * (m.in_features + m.out_features)
        for n, m in decoder_linears(model).items()
        if n.rsplit(".", 1)[-1] in LORA_TARGETS
    )


def neuron_counts(modules: dict, total: int) -> dict[str, list[int]]:
    """Entries per row of every layer for ``total`` entries at neuron level: ``K = total // rows`` each, one more for
    the first ``total - K * rows`` rows (which rows get them changes no tensor's size)."""
    rows = sum(m.out_features for m in modules.values())
    k, extra = divmod(total, rows)
    counts = {}
    for name, m in modules.items():
        plus = min(extra, m.out_features)
        extra -= plus
        counts[name] = [plus, k]  # [rows with k + 1, k]
    return counts


def _fake_indices(modules: dict, total: int) -> dict:
    """Sorted flat indices of a neuron-level selection of ``total`` entries, as tensors of the right size (made under
    the fake mode: values are not needed, sizes are)."""
    out = {}
    for name, (plus, k) in neuron_counts(modules, total).items():
        n = plus * (k + 1) + (modules[name].out_features - plus) * k
        out[f"{name}.weight"] = torch.empty(n, dtype=torch.long)
    return out


def _shira_mask_fn(base_layer, r: int, **kwargs):
    """SHiRA's mask for the meta model: ``r * (in + out)`` ones, a real CPU tensor (SHiRA reads its nonzeros)."""
    out, fan_in = base_layer.out_features, base_layer.in_features
    mask = torch.zeros(out * fan_in, dtype=torch.bfloat16)
    mask[: r * (out + fan_in)] = 1
    return mask.view(out, fan_in)


def _shira_forward(self, x: Tensor, *args, **kwargs) -> Tensor:
    """SHiRA's forward (peft ``tuners/shira/layer.py``: a dense clone of the base weight, the sparse delta added into
    it, ``F.linear``) with the sparse COO add written as an ``index_add_`` into the same clone: torch's sparse COO
    constructor has no backward on fake tensors. The same tensors live: the clone (saved for the backward), the
    dense weight gradient the add's backward gathers from, the input."""
    weight = self.get_base_weight().clone()
    for adapter in self.active_adapters:
        if adapter in self.shira_weight:
            rows, cols = self.shira_indices[adapter].long()
            values = (self.shira_weight[adapter] * self.scaling[adapter]).to(weight.dtype)
            weight.view(-1).index_add_(0, rows * self.in_features + cols, values)
    return F.linear(x, weight, bias=self.base_layer.bias)


def _peft_model(model, name: str, r: int):
    from peft import LoraConfig, ShiraConfig, get_peft_model

    if name == "lora":
        config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=list(LORA_TARGETS))
    else:
        config = ShiraConfig(r=r, target_modules=list(LORA_TARGETS))
        config.mask_fn = _shira_mask_fn
    model = get_peft_model(model, config)
    if name == "shira":
        for module in model.modules():
            if hasattr(module, "shira_weight"):
                module.forward = functools.partial(_shira_forward, module)
    return model


def _real_tokens(keep: Tensor):
    """fps's per-layer selection of the real tokens (``x[attention_mask]``), with a size the fake mode can know: every
    token counted (no padding in the batch), the same ``[tokens, features]`` copy the boolean index makes."""
    index = torch.arange(keep.numel())

    def select(name: str, x: Tensor) -> Tensor:
        return x.reshape(-1, x.shape[-1]).index_select(0, index)

    return select


def _all_positions(hidden: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fps_cli.tasks.next_token.counted_positions` with a size the fake mode can know: every position but the
    last counted (the batch has no ``-100`` label), the same ``[tokens, hidden]`` copy the boolean index makes."""
    index = torch.arange(hidden.shape[0] * (hidden.shape[1] - 1))
    tokens = torch.tensor(index.numel())
    return hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, index), labels[:, 1:].reshape(-1), tokens


def run_llm_pass(name: str, args: argparse.Namespace, checkpointing: bool) -> int:
    """Peak live tensor bytes of one pass of a language model at PEFT's MetaMathQA setting, on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import LlamaForCausalLM

    from fps_cli.activations import input_stats_hooks
    from fps_cli.finetune import TrainConfig, make_optimizer
    from fps_cli.sparse import attach, recompute_sparse_weights
    from fps_cli.tasks import causal_lm, next_token

    with torch.device("meta"):
        model = LlamaForCausalLM(llm_config(args.model)).to(torch.bfloat16)
    count = lora_count(model, args.lora_r)
    if name in ("lora", "shira"):
        model = _peft_model(model, name, args.lora_r)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with FakeTensorMode(allow_non_fake_inputs=True):
        model.to_empty(device="cpu")
        ids = torch.zeros(args.batch_size, args.seq_len, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        indices = _fake_indices(decoder_linears(model), count) if name.startswith("sparse") else None
        memory = LiveMemory()
        with memory:
            memory.track([list(model.parameters()), list(model.buffers()), batch])
            if name in ("inference", "inference_last"):
                model.eval()
                keep = {"logits_to_keep": 1} if name == "inference_last" else {}
                with torch.inference_mode():
                    model(input_ids=ids, attention_mask=batch["attention_mask"], **keep)
            elif name == "fps":
                model.eval()
                modules = decoder_linears(model)
                with input_stats_hooks(modules, _real_tokens(batch["attention_mask"])), torch.inference_mode():
                    causal_lm.statistics_forward(model, batch)
            else:
                model.train()
                config = TrainConfig(lr=1e-4, weight_decay=0.1)
                if name.startswith("sparse"):
                    sparse = attach(model, indices, [])
                    optimizer = make_optimizer(sparse, config)
                    context = recompute_sparse_weights
                else:
                    trainable = [p for p in model.parameters() if p.requires_grad]
                    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
                    context = contextlib.nullcontext
                if name == "sparse":
                    # LlamaForCausalLM's logits are its lm_head on its decoder's output (fake values cannot be compared)
                    next_token.assume_plain_head(model)
                counted = next_token.counted_positions
                next_token.counted_positions = _all_positions
                try:
                    for _ in range(2):
                        with context():
                            if name == "sparse":  # fps train's forward and loss
                                loss = causal_lm.loss(causal_lm.forward(model, batch), batch)
                            else:
                                loss = model(**batch).loss
                        loss.backward()
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                finally:
                    next_token.counted_positions = counted  # the estimate runs in tests' processes too
    return memory.peak


def estimate_llm(args: argparse.Namespace) -> dict:
    with torch.device("meta"):
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(llm_config(args.model))
    count = lora_count(model, args.lora_r)
    report = {
        "model": args.model,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "params": sum(p.numel() for p in model.parameters()),
        "trainable": count,
        "lora_r": args.lora_r,
    }
    for checkpointing in args.checkpointing:
        started = time.perf_counter()
        passes = [n for n in args.passes if checkpointing == "off" or n not in ("inference", "inference_last", "fps")]
        peaks = {name: run_llm_pass(name, args, checkpointing == "on") for name in passes}
        ratios = {}
        for base in ("inference", "inference_last"):
            if {"fps", base} <= peaks.keys():
                ratios[f"fps_over_{base}"] = peaks["fps"] / peaks[base]
        for ours in ("sparse", "sparse_hf_loss"):
            for other in ("full", "lora", "shira"):
                if {ours, other} <= peaks.keys():
                    ratios[f"{ours}_over_{other}"] = peaks[ours] / peaks[other]
        key = "checkpointing" if checkpointing == "on" else "no_checkpointing"
        report[key] = {"peak_bytes": peaks, "ratios": ratios, "seconds": time.perf_counter() - started}
    return report


TARGETS = {
    "fps_over_inference": "<= 1.10 (issue 13: <= 1.05)",
    "gps_over_fps": ">= 9",
    "gps_released_over_fps": ">= 9",
    "sparse_over_full": "<= 0.70",
    "sparse_dense_over_full": "(the old dense-gradient path)",
    "fps_over_inference_last": "(inference with the last position's logits only)",
    "sparse_over_lora": "<= 1.00",
    "sparse_over_shira": "",
    "sparse_hf_loss_over_full": "(transformers' loss)",
    "sparse_hf_loss_over_lora": "(transformers' loss)",
    "sparse_hf_loss_over_shira": "(transformers' loss)",
}
LLM_TARGETS = {**TARGETS, "fps_over_inference": "<= 1.10", "sparse_over_full": "(< 1)"}


def print_llm(args: argparse.Namespace, report: dict) -> None:
    print(
        f"{args.model} ({report['params'] / 1e9:.2f} B parameters), bf16, length {args.seq_len}, batch "
        f"{args.batch_size}: peak live tensor memory on fake tensors; trainable {report['trainable']:,} "
        f"(LoRA r={args.lora_r} on q/v) for lora, shira and sparse"
    )
    for key in ("no_checkpointing", "checkpointing"):
        if key not in report:
            continue
        row = report[key]
        print(f"  {key.replace('_', ' ')} ({row['seconds']:.0f} s)      GiB      GB   PEFT measured (GB, L40S, 3B)")
        for name, peak in row["peak_bytes"].items():
            measured = PEFT_MEASURED_GB.get(name) if key == "no_checkpointing" else None
            extra = f"  {measured}" if measured is not None and args.model == "llama-3.2-3b" else ""
            print(f"    {name:15s} {peak / 2**30:7.2f} {peak / 1e9:7.2f}{extra}")
        for name, ratio in row["ratios"].items():
            print(f"    {name:26s} {ratio:6.3f}  target {LLM_TARGETS[name]}")


def main(argv: list[str] | None = None) -> None:
    args = _args(argv)
    if args.model in LLM_SHAPES:
        report = estimate_llm(args)
        if args.json:
            print(json.dumps(report))
        else:
            print_llm(args, report)
        return
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
