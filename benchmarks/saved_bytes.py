"""Bytes saved for backward by one training forward: the dense path vs the sparse path, with and without recipes.

A Llama-style model (transformers ``LlamaForCausalLM`` from a config alone, random weights: ``--hidden`` wide,
``--layers`` decoder layers) and a ViT (timm ``vit_tiny_patch16_224``), fp32 on the CPU, a random neuron-level mask
(2 entries per row of every Linear but the head), the head trained in full. The figure is the total size of the
distinct storages autograd keeps between the forward and the backward (``saved_tensors_hooks``), weights and
parameters included (they are kept by reference, so they count once).

- ``dense``: every masked layer through the parametrization (``attach(..., path="dense")``).
- ``sparse, no recipes``: the sparse path saving every Linear's input (fps before its recipes; for the Llama
  model, also fps before issue 20's RMSNorm recipes, which it had none of).
- ``sparse``: the sparse path as it is, rebuilding the norm / activation outputs its Linears are fed.

    python benchmarks/saved_bytes.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fps_cli import sparse


def _indices(model: nn.Module, head: nn.Module) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and module is not head:
            rows, cols = module.weight.shape
            picks = torch.stack([torch.randperm(cols, generator=generator)[:2] for _ in range(rows)])
            out[f"{name}.weight"] = (torch.arange(rows)[:, None] * cols + picks).reshape(-1).sort().values
    return out


def saved_bytes(model: nn.Module, run, indices, full, path: str, recipes: bool = True) -> tuple[int, int]:
    params = sparse.attach(model, indices, full, path=path)
    storages: dict[int, int] = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    pack._fps_pack = True  # returns every tensor as it is, as fps's own hooks do (see sparse._product_recipe)

    original = sparse._input_recipe
    if not recipes:
        sparse._input_recipe = lambda *args: None
    taken = sparse._RECIPES_TAKEN[0]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run(model).backward()
    finally:
        sparse._input_recipe = original
        sparse.detach(model, params)
    return sum(storages.values()), sparse._RECIPES_TAKEN[0] - taken


def llama(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3 // 64 * 64 or 64,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 256),
        vocab_size=1024,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    ids = torch.randint(0, 1024, (args.batch_size, args.seq_len), generator=torch.Generator().manual_seed(1))
    return model, model.lm_head, ["lm_head.weight"], lambda m: m(input_ids=ids).logits.logsumexp(-1).mean()


def vit(args):
    import timm

    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10)
    images = torch.randn(args.batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    return model, model.head, ["head.weight", "head.bias"], lambda m: m(images).logsumexp(-1).mean()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    report = {}
    for name, build in (("llama", llama), ("vit_tiny", vit)):
        model, head, full, run = build(args)
        indices = _indices(model, head)
        rows = {}
        for label, path, recipes in (
            ("dense", "dense", True),
            ("sparse, no recipes", "sparse", False),
            ("sparse", "sparse", True),
        ):
            total, taken = saved_bytes(model, run, indices, full, path, recipes)
            rows[label] = {"saved_bytes": total, "recipes_taken": taken}
        for row in rows.values():
            row["ratio_to_dense"] = row["saved_bytes"] / rows["dense"]["saved_bytes"]
        report[name] = rows
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"bytes saved for backward, fp32 CPU (llama: hidden {args.hidden}, {args.layers} layers, "
        f"batch {args.batch_size} x {args.seq_len} tokens; vit_tiny: batch {args.batch_size})"
    )
    for name, rows in report.items():
        for label, row in rows.items():
            print(
                f"  {name:9s} {label:20s} {row['saved_bytes'] / 2**20:8.2f} MiB  {row['ratio_to_dense']:.3f} of dense"
                f"  ({row['recipes_taken']} recipes taken)"
            )


if __name__ == "__main__":
    main()
