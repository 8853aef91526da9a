"""Regenerate examples/digits/ from scikit-learn's bundled 8x8 handwritten digits (no download).

    python examples/make_digits.py [--out DIR] [--classes 0 1 ...] [--per-class-train 12] [--per-class-val 4]
                                   [--size 32]

Writes ``DIR/train/<digit>/*.png`` and ``DIR/val/<digit>/*.png``: upsampled 32x32 grey images, the first images of
each chosen class in scikit-learn's order. The committed ``examples/digits`` was made with the defaults;
``examples/quickstart.sh`` makes a source set (digits 0-4) and a target set (digits 5-9) with it.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def write_digits(
    out: Path, classes: list[int], per_class_train: int = 12, per_class_val: int = 4, size: int = 32
) -> dict[int, int]:
    """Write the PNG folders; returns the number of images written per digit."""
    try:
        import numpy as np
        from PIL import Image
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise SystemExit(f"error: {e.name} is missing; pip install -e '.[examples]' for scikit-learn") from None

    digits = load_digits()
    images = (digits.images / 16.0 * 255).astype(np.uint8)  # [n, 8, 8], values 0..16 in the source
    wanted = set(classes)
    taken: dict[int, int] = {}
    for image, label in zip(images, digits.target, strict=True):
        label = int(label)
        i = taken.get(label, 0)
        if label not in wanted or i >= per_class_train + per_class_val:
            continue
        split = "train" if i < per_class_train else "val"
        folder = out / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).resize((size, size), Image.BILINEAR).save(folder / f"{i:03d}.png")
        taken[label] = i + 1
    return taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "digits")
    parser.add_argument("--classes", type=int, nargs="+", default=list(range(10)), help="digits to write")
    parser.add_argument("--per-class-train", type=int, default=12)
    parser.add_argument("--per-class-val", type=int, default=4)
    parser.add_argument("--size", type=int, default=32)
    args = parser.parse_args()
    taken = write_digits(args.out, args.classes, args.per_class_train, args.per_class_val, args.size)
    print(f"wrote {sum(taken.values())} images of digits {sorted(taken)} to {args.out}")


if __name__ == "__main__":
    main()
