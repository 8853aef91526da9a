"""Regenerate examples/digits/ from scikit-learn's bundled 8x8 handwritten digits (no download).

    python examples/make_digits.py [--per-class-train 12] [--per-class-val 4] [--size 32]

Writes ``digits/train/<digit>/*.png`` and ``digits/val/<digit>/*.png``: upsampled 32x32 grey images, the first
images of each class in scikit-learn's order. The committed folder was made with the defaults.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "digits")
    parser.add_argument("--per-class-train", type=int, default=12)
    parser.add_argument("--per-class-val", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)  # [n, 8, 8], values 0..16 in the source
    taken: dict[int, int] = {}
    for image, label in zip(images, digits.target, strict=True):
        label = int(label)
        i = taken.get(label, 0)
        if i >= args.per_class_train + args.per_class_val:
            continue
        split = "train" if i < args.per_class_train else "val"
        folder = args.out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((args.size, args.size), Image.BILINEAR).save(folder / f"{i:03d}.png")
        taken[label] = i + 1
    print(f"wrote {sum(taken.values())} images to {args.out}")


if __name__ == "__main__":
    main()
