#!/usr/bin/env bash
# The README's quickstart, end to end on the bundled digits sample (no download, CPU is fine).
# Usage: bash examples/quickstart.sh [WORKDIR]    (default: a fresh temporary folder)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work" && cd "$work"
echo "working in $work" >&2

# 1. Score every weight of a (randomly initialised, tiny) ViT with one forward pass over the images,
#    and keep 5% of the parameters trainable in total: selected entries + head + biases.
fps select --model test_vit --no-pretrained --img-size 32 --data "$here/digits" --budget 0.05 --num-workers 0 --json

# 2. Re-select at another budget and granularity from the saved statistics: no data pass.
fps select --from-scores scores.safetensors --budget 0.02 --granularity layer -o mask_2pct.safetensors --json

# 3. Read the mask from Python.
python - <<'PY'
from fps_cli import load_mask, read_mask

mask = read_mask("mask.safetensors")
print(f"{mask.selected} selected entries in {len(mask.indices)} layers, {mask.trainable} trainable in total")
dense = load_mask("mask.safetensors")  # {parameter name: bool tensor shaped like it}
print("blocks.0.mlp.fc1.weight:", int(dense["blocks.0.mlp.fc1.weight"].sum()), "trainable entries")
PY
