"""Image folders (DESIGN.md section 3): discovery, decoding, timm transforms and streaming loaders.

Layouts, in the order they are tried:

- ``DIR/train/<class>/...`` with an optional ``DIR/val/`` (or ``validation/``, ``test/``) of the same classes;
- ``DIR/<class>/...``: class sub-folders, searched recursively (torchvision ``ImageFolder`` convention);
- ``DIR/*.jpg``: a flat folder of unlabeled images (enough for ``--method fps``).

Classes are the sorted sub-folder names that hold at least one image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .errors import DataError
from .outputs import recover

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
VAL_SPLITS = ("val", "validation", "test")
UNLABELED = -1


@dataclass
class ImageSplit:
    """One split of an image folder.

    Attributes:
        root: the folder.
        samples: (image path, class index) in sorted order; the index is ``-1`` in a flat folder.
        classes: class names (empty for a flat folder).
    """

    root: Path
    samples: list[tuple[Path, int]]
    classes: list[str]

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


@dataclass
class ImageFolder:
    """A data folder: the training split and, when present, a validation split."""

    train: ImageSplit
    val: ImageSplit | None


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def _is_file(path: Path) -> bool:
    """A file, or a link to one that may be dangling: it is an image the user put there, reported if unreadable."""
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p) and _is_file(p))


def scan_split(root: Path, classes: list[str] | None = None) -> ImageSplit:
    """Scan one split; ``classes`` fixes the class list (a validation split must use the training classes)."""
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {d.name: _images_under(d) for d in subdirs}
    found = [name for name, files in per_class.items() if files]
    if found:
        names = classes if classes is not None else found
        unknown = sorted(set(found) - set(names))
        if unknown:
            raise DataError(f"{root} has classes the training split lacks: {', '.join(unknown)}")
        index = {name: i for i, name in enumerate(names)}
        samples = [(path, index[name]) for name in found for path in per_class[name]]
        return ImageSplit(root, samples, list(names))
    flat = sorted(p for p in root.iterdir() if _is_file(p) and _is_image(p))
    if not flat:
        raise DataError(f"no images found in {root} (looked for {', '.join(IMG_EXTENSIONS)})")
    return ImageSplit(root, [(p, UNLABELED) for p in flat], [])


def discover(data_dir: str | os.PathLike) -> ImageFolder:
    """Find the layout of ``data_dir`` and list its images.

    Raises:
        DataError: the folder is missing, or holds no images.
    """
    root = Path(data_dir).expanduser()
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a directory")
    recover(root)  # a group write killed half-way in the folder reads as all old (outputs.py)
    if (root / "train").is_dir():
        train = scan_split(root / "train")
        val = None
        for name in VAL_SPLITS:
            if (root / name).is_dir():
                val = scan_split(root / name, classes=train.classes if train.labeled else None)
                break
        return ImageFolder(train, val)
    return ImageFolder(scan_split(root), None)


class ImageDataset(Dataset):
    """Decodes images with PIL and applies ``transform``; a bad image yields ``None`` instead of raising.

    Errors are reported from the main process by :class:`ImageStream`, with the image's path, rather than as a
    traceback from inside a DataLoader worker.
    """

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable | None) -> None:
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int, int, str]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")
        except Exception as e:
            return None, label, index, str(e) or type(e).__name__
        return (self.transform(img) if self.transform else img), label, index, ""


def collate(items: list[tuple[Tensor | None, int, int, str]]) -> tuple[Tensor | None, Tensor, list[tuple[int, str]]]:
    """Stack the good images; return ``(images [B, 3, H, W] or None, labels [B], [(index, error), ...])``."""
    good = [(img, label) for img, label, _, _ in items if img is not None]
    bad = [(index, error) for img, _, index, error in items if img is None]
    if not good:
        return None, torch.zeros(0, dtype=torch.long), bad
    images = torch.stack([img for img, _ in good])
    labels = torch.tensor([label for _, label in good], dtype=torch.long)
    return images, labels, bad


def default_num_workers(device: torch.device) -> int:
    """Loader workers: enough to feed a GPU; on a CPU, leave most cores to the model."""
    cpus = os.cpu_count() or 1
    if device.type == "cuda":
        return min(8, cpus)
    return min(4, cpus // 2)


def subsample(samples: list[tuple[Path, int]], max_samples: int | None, seed: int) -> list[tuple[Path, int]]:
    """A seeded random subset of ``max_samples`` images, kept in folder order (so every class is represented)."""
    if max_samples is None or max_samples >= len(samples):
        return samples
    if max_samples < 1:
        raise DataError(f"--max-samples must be at least 1, got {max_samples}")
    keep = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed))[:max_samples]
    return [samples[i] for i in sorted(keep.tolist())]


def make_loader(
    samples: list[tuple[Path, int]],
    transform: Callable | None,
    *,
    batch_size: int,
    num_workers: int,
    pin_memory: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    batches: list[list[int]] | None = None,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """A DataLoader over ``samples`` that yields ``(images, labels, bad)`` (see :func:`collate`).

    Args:
        batches: explicit batches of sample indices (a rank's shard); replaces ``batch_size`` / ``shuffle``.
        sampler: the order of the samples (e.g. a rank's share of an epoch); replaces ``shuffle``.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    dataset = ImageDataset(samples, transform)
    common = dict(num_workers=num_workers, collate_fn=collate, pin_memory=pin_memory, persistent_workers=False)
    if batches is not None:
        return DataLoader(dataset, batch_sampler=batches, **common)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        **common,
    )


class ImageStream:
    """Iterates a loader's image batches; stops at the first unreadable image unless ``skip_bad``.

    Attributes:
        skipped: paths of the images skipped so far.
        seen: images yielded so far.
    """

    def __init__(self, loader: DataLoader, *, skip_bad: bool = False, with_labels: bool = False) -> None:
        self.loader, self.skip_bad, self.with_labels = loader, skip_bad, with_labels
        self.skipped: list[Path] = []
        self.seen = 0

    def __iter__(self) -> Iterator:
        samples = self.loader.dataset.samples
        for images, labels, bad in self.loader:
            for index, error in bad:
                path = samples[index][0]
                if not self.skip_bad:
                    raise DataError(f"cannot read image {path}: {error} (pass --skip-bad-images to skip such files)")
                self.skipped.append(path)
            if images is None:
                continue
            self.seen += images.shape[0]
            yield (images, labels) if self.with_labels else images


def transform_config(model: nn.Module, img_size: int | None = None) -> dict:
    """timm's data config for ``model`` (mean, std, interpolation, crop), at ``img_size`` when given."""
    from timm.data import resolve_model_data_config

    config = resolve_model_data_config(model)
    if img_size is not None:
        config["input_size"] = (3, img_size, img_size)
    return config


def eval_transform(model: nn.Module, img_size: int | None = None) -> Callable:
    """timm's deterministic eval transform for ``model`` (resize, center crop, normalise)."""
    from timm.data import create_transform

    return create_transform(**transform_config(model, img_size), is_training=False)
