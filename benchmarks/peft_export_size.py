"""File size of an fps delta written as a PEFT SHiRA adapter (``fps export --to peft``), and of the Super-Tuning
layout for comparison.

Sizes depend on the mask's shape only, not on the trained values, so the delta here is the mask of a real
``fps select`` run (FPS, neuron granularity) with random values: no training is needed. The SHiRA adapter is written
by the same code as ``fps export``; the Super-Tuning figure is computed from its format (flat int32 indices and fp32
values per layer, ``int(in * out * (1 - sparsity))`` entries for one ``sparsity``, so the densest layer sets it).

    python benchmarks/peft_export_size.py --model vit_base_patch16_224 --budget 0.0077
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--budget", type=float, default=0.0077)
    parser.add_argument("--images", type=int, default=4)
    args = parser.parse_args()

    from conftest import write_images

    from fps_cli.candidates import parameter_roles
    from fps_cli.formats import Delta, save_delta
    from fps_cli.models import ModelSpec
    from fps_cli.peft_adapter import PREFIX, adapter_tensors, plan_adapter
    from fps_cli.selector import SelectOptions, run_select, seed_everything

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_images(tmp / "data", args.images, size=args.img_size or 224)
        spec = ModelSpec(args.model, pretrained=False, num_classes=10, img_size=args.img_size)
        result = run_select(spec, tmp / "data", SelectOptions(budget=args.budget), num_workers=0)
        mask = result.mask
        seed_everything(0)
        from fps_cli.models import create_model

        model = create_model(spec)
        params = dict(model.named_parameters())
        g = torch.Generator().manual_seed(0)
        delta = Delta(
            indices={n: i.long() for n, i in mask.indices.items()},
            values={n: torch.randn(i.numel(), generator=g) * 1e-3 for n, i in mask.indices.items()},
            full={n: params[n].detach().clone() for n in mask.fully_trainable},
            shapes={n: tuple(p.shape) for n, p in params.items()},
            provenance={"model": args.model},
        )
        save_delta(tmp / "delta.safetensors", delta)
        delta_bytes = (tmp / "delta.safetensors").stat().st_size

        plan = plan_adapter(model, delta)
        tensors, padded = adapter_tensors(model, delta, plan)
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
        adapter_bytes = (tmp / "adapter_model.safetensors").stat().st_size

        def nbytes(keys):
            return sum(tensors[k].numel() * tensors[k].element_size() for k in keys)

        sparse_keys = [k for k in tensors if k.endswith((".shira_indices", ".shira_weight"))]
        whole_keys = [k for k in tensors if any(k.startswith(f"{PREFIX}{m}.") for m in plan.whole)]
        bias_keys = [k for k in tensors if ".base_layer." in k]
        entries = sum(int(delta.indices[f"{n}.weight"].numel()) for n in plan.sparse)

        # Super-Tuning: one sparsity for every layer, so every layer is padded to the densest layer's density.
        density = max(delta.indices[f"{n}.weight"].numel() / m.weight.numel() for n, m in plan.sparse.items())
        st_entries = sum(math.ceil(m.weight.numel() * density) for m in plan.sparse.values())
        st_bytes = 8 * st_entries + nbytes(whole_keys) + nbytes(bias_keys)

        roles = parameter_roles(model)
        print(f"model {args.model}, budget {args.budget}, {roles.total_params:,} parameters")
        selected = sum(int(i.numel()) for i in mask.indices.values())
        print(f"delta file: {delta_bytes:,} bytes ({selected:,} selected entries)")
        print(f"SHiRA r={plan.r}: {len(plan.sparse)} sparse layers, {entries:,} entries + {padded:,} zero padding")
        print(f"  modules_to_save: {plan.whole}")
        print(
            f"  adapter file: {adapter_bytes:,} bytes = {adapter_bytes / delta_bytes:.2f}x the delta "
            f"(sparse part {nbytes(sparse_keys):,}, whole modules {nbytes(whole_keys):,}, biases {nbytes(bias_keys):,})"
        )
        delta_sparse = 8 * entries
        print(
            f"  sparse part alone: {nbytes(sparse_keys) / delta_sparse:.2f}x the delta's 8 bytes per entry "
            f"(padding {padded / entries:.2f}x the entries, 12 bytes per entry)"
        )
        print(
            f"Super-Tuning (computed): {st_entries:,} entries ({st_entries / entries - 1:.2f}x padding), "
            f"{st_bytes:,} bytes = {st_bytes / delta_bytes:.2f}x the delta; sparse part "
            f"{8 * st_entries / delta_sparse:.2f}x"
        )


if __name__ == "__main__":
    main()
