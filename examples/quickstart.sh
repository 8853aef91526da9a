#!/usr/bin/env bash
# The README's quickstart, end to end on the bundled digits sample (no download, CPU is fine, about a minute).
# Usage: bash examples/quickstart.sh [WORKDIR]    (default: a fresh temporary folder)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work" && cd "$work"
echo "working in $work" >&2

# 1. Score every weight of a (randomly initialised, tiny) ViT with one forward pass over the images, and keep 5% of
#    the parameters trainable in total: selected entries + head + biases.
fps select --model test_vit --no-pretrained --img-size 32 --data "$here/digits" --budget 0.05 --num-workers 0 --json

# 2. Re-select at another budget and granularity from the saved statistics: no data pass.
fps select --from-scores scores.safetensors --budget 0.02 --granularity layer -o mask_2pct.safetensors --json

# 3. Fine-tune only what the mask selected (everything else comes from the mask), then evaluate on digits/val.
fps train --epochs 2 --lr 0.01 --num-workers 0 --json
fps eval --num-workers 0 --json

# 4. Merge the delta into full weights (a timm local-dir: folder) and look at what was selected and what changed.
fps merge -o merged/ --json
fps inspect mask.safetensors mask_2pct.safetensors
fps inspect delta.safetensors --json > delta_report.json

# 5. The same from Python.
python - <<'PY'
import timm
import torch

from fps_cli import load_mask, load_merged, read_mask

mask = read_mask("mask.safetensors")
print(f"{mask.selected} selected entries in {len(mask.indices)} layers, {mask.trainable} trainable in total")
dense = load_mask("mask.safetensors")  # {parameter name: bool tensor shaped like it}
print("blocks.0.mlp.fc1.weight:", int(dense["blocks.0.mlp.fc1.weight"].sum()), "trainable entries")

images = torch.randn(2, 3, 32, 32)
fine_tuned = load_merged("delta.safetensors").eval()  # the recorded base, checked, plus the delta
exported = timm.create_model("local-dir:merged", pretrained=True).eval()  # what fps merge wrote
with torch.no_grad():
    assert torch.allclose(fine_tuned(images), exported(images), atol=1e-5)
print("merged folder reproduces the fine-tuned model")
PY
