#!/usr/bin/env bash
# The README's quickstart, end to end with no download, on two CPU cores in about a minute: give a tiny ViT something
# to start from (a few seconds of training on the digits 0-4), then select, fine-tune on the digits 5-9, and compare
# with training the head alone and with chance.
# Usage: bash examples/quickstart.sh [WORKDIR]    (default: a fresh temporary folder)
# Needs scikit-learn for its bundled digits: pip install -e ".[examples]"
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
work="${1:-$(mktemp -d)}"
mkdir -p "$work" && cd "$work"
echo "working in $work" >&2
# One thread per process: a model this small gains nothing from more, and loses much when the cores are busy.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

# 0. The data and the "pretrained" model: 700 images of digits 0-4 to pretrain on (a stand-in for ImageNet), and a
#    small target task, digits 5-9 (20 training and 40 validation images per class).
python "$here/make_digits.py" --out source --classes 0 1 2 3 4 --per-class-train 140 --per-class-val 30
python "$here/make_digits.py" --out target --classes 5 6 7 8 9 --per-class-train 20 --per-class-val 40
python "$here/pretrain_digits.py" --data source -o source.safetensors --epochs 30
model=(--model test_vit --checkpoint source.safetensors --img-size 32)

# 1. Score every weight of the model with one forward pass over the target images, and keep 5% of the parameters
#    trainable in total: selected entries + head + biases.
fps select "${model[@]}" --data target --budget 0.05 --num-workers 0 --json

# 2. Re-select at another budget and granularity from the saved statistics: no data pass.
fps select --from-scores scores.safetensors --budget 0.02 --granularity layer -o mask_2pct.safetensors --json

# 3. Fine-tune only what the mask selected (model, data and classes come from the mask), and, for comparison, the
#    head alone (--method linear) with the same recipe.
fps train --epochs 12 --lr 0.03 --no-augment --num-workers 0 --json | tee train.json
fps select "${model[@]}" --data target --method linear -o linear.safetensors --json
fps train --mask linear.safetensors -o linear_delta.safetensors --epochs 12 --lr 0.03 --no-augment --num-workers 0 \
    --json | tee linear_train.json
fps eval --num-workers 0 --json

# 4. Merge the delta into full weights (a timm local-dir: folder) and look at what was selected and what changed.
fps merge -o merged/ --json
fps inspect mask.safetensors mask_2pct.safetensors
fps inspect delta.safetensors --json > delta_report.json

# 5. The same from Python, and the result beside its two references.
python - <<'PY'
import json

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

sparse = json.load(open("train.json"))["metrics"]["val_top1"]
head = json.load(open("linear_train.json"))["metrics"]["val_top1"]
chance = 100.0 / mask.provenance["num_classes"]
print(f"val top-1 on digits 5-9: fps mask (5% trainable) {sparse:.1f}% | head only {head:.1f}% | chance {chance:.1f}%")
PY
