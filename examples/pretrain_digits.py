"""Give the quickstart's tiny ViT something to start from: a few seconds of training on other digits.

    python examples/pretrain_digits.py --data source -o source.safetensors [--epochs 30] [--seed 0]

Trains timm's ``test_vit`` (32x32 input, randomly initialised) on an image folder such as the digits 0-4 that
``examples/make_digits.py --classes 0 1 2 3 4`` writes, then saves its backbone (no head) as safetensors: the
local checkpoint ``fps select --checkpoint`` and ``fps train`` start from, as they would from ImageNet weights.
The same recipe as ``benchmarks/transfer.py``: timm's eval transform, random shifts of up to 2 pixels, AdamW,
one-cycle schedule, label smoothing 0.1.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path


def pretrain(data: Path, out: Path, *, epochs: int = 30, seed: int = 0) -> str:
    """Train test_vit on the image folder ``data``, save its backbone to ``out``; returns a one-line summary."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.3 M-parameter model gains nothing from threads, and loses much on busy cores
    try:
        return _train(data, out, epochs, seed)
    finally:
        torch.set_num_threads(threads)


def _train(data: Path, out: Path, epochs: int, seed: int) -> str:
    import torch
    import torch.nn.functional as F
    from PIL import Image
    from safetensors.torch import save_file

    from fps_cli.data import discover, eval_transform
    from fps_cli.models import ModelSpec, create_model
    from fps_cli.selector import seed_everything

    seed_everything(seed)
    folder = discover(data)
    model = create_model(ModelSpec("test_vit", pretrained=False, num_classes=len(folder.train.classes), img_size=32))
    tf = eval_transform(model, 32)

    def load(split):
        xs = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in split.samples])
        return xs, torch.tensor([label for _, label in split.samples])

    x_train, y_train = load(folder.train)
    batch, started = 64, time.perf_counter()
    steps = epochs * math.ceil(len(x_train) / batch)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x_train), generator=generator)
        for start in range(0, len(perm), batch):
            idx = perm[start : start + batch]
            xb = F.pad(x_train[idx], (2, 2, 2, 2), mode="replicate")  # random shifts of up to 2 pixels
            dx, dy = torch.randint(0, 5, (2,), generator=generator).tolist()
            loss = F.cross_entropy(model(xb[:, :, dy : dy + 32, dx : dx + 32]), y_train[idx], label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    model.eval()
    score = ""
    if folder.val is not None:
        x_val, y_val = load(folder.val)
        with torch.no_grad():
            score = f", val top-1 {100.0 * float((model(x_val).argmax(1) == y_val).float().mean()):.1f}%"
    head = {n for n, _ in model.get_classifier().named_parameters(prefix="head")}
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in head}  # the head is the task's
    save_file(state, str(out), metadata={"source": str(data), "epochs": str(epochs)})
    seconds = time.perf_counter() - started
    return f"pretrained test_vit on {len(x_train)} images of {data} in {seconds:.0f} s{score}; wrote {out}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="image folder with train/ (and val/) splits")
    parser.add_argument("-o", "--out", type=Path, default=Path("source.safetensors"))
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(pretrain(args.data, args.out, epochs=args.epochs, seed=args.seed))


if __name__ == "__main__":
    main()
