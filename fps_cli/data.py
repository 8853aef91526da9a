"""Image data (DESIGN.md section 3): discovery, decoding, timm transforms and streaming loaders.

``--data`` is, in the order :func:`discover` tries (``--dataset-format`` forces one):

- a dataset in its published layout, found by its split files (:mod:`.layouts`): CUB_200_2011 as downloaded
  (``cub``), VTAB-1k list files (``vtab``), the FGVC JSON splits of VPT / GPS (``fgvc-json``);
- ``DIR/train/<class>/...`` with an optional ``DIR/val/`` (or ``validation/``, ``test/``) of the same classes;
- ``DIR/<class>/...``: class sub-folders, searched recursively (torchvision ``ImageFolder`` convention);
- ``DIR/*.jpg``: a flat folder of unlabeled images (enough for ``--method fps``);
- a timm dataset spec (``timm``): a ``.tar`` of class folders, ``hfds/NAME``, ``torch/NAME@ROOT`` and the other
  names :func:`timm.data.create_dataset` takes with random access (see :mod:`.timm_data`).

fps lists the images of the first four itself, rather than through timm's readers: a listed path lets an
unreadable image be reported by path (and skipped with ``--skip-bad-images``), and the split files' lines be named
in errors. Classes of a folder are the sorted sub-folder names that hold at least one image.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .constants import DATASET_FORMATS
from .errors import DataError
from .outputs import recover
from .timm_data import TIMM_PREFIXES, timm_splits

if TYPE_CHECKING:
    from .layouts import Layout

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
    name: str = ""

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


@dataclass
class ImageFolder:
    """A dataset: the training split and, when present, a validation and a test split.

    Attributes:
        train, val, test: the splits that train, validate (each epoch of ``fps train``) and test (``fps eval
            --split test``); ``val`` falls back to the test split when the data has no separate one.
        layout: how the data was read: ``folder``, ``cub``, ``vtab``, ``fgvc-json`` or ``timm``.
        splits: every split the data has, by name (``train``, ``val``, ``train800``, ``is_train=0``, ...), for
            ``fps eval --split NAME``.
        location: what a file's provenance records as the data (:func:`data_location` of ``--data``).
    """

    train: ImageSplit
    val: ImageSplit | None
    test: ImageSplit | None = None
    layout: str = "folder"
    splits: dict[str, ImageSplit] = field(default_factory=dict)
    location: str = ""

    def split(self, name: str) -> ImageSplit:
        """The split ``name``: a role (``train``, ``val``, ``test``) or one of :attr:`splits`.

        Raises:
            DataError: the data has no such split (the ones it has are named).
        """
        chosen = {"train": self.train, "val": self.val, "test": self.test}.get(name) or self.splits.get(name)
        if chosen is None:
            have = ", ".join(dict.fromkeys([r for r in ("train", "val", "test") if self.role(r)] + list(self.splits)))
            raise DataError(f"{self.train.root} has no {name!r} split; it has: {have}")
        return chosen

    def role(self, role: str) -> ImageSplit | None:
        return {"train": self.train, "val": self.val, "test": self.test}[role]

    def provenance(self) -> dict[str, str]:
        """Which split trains, validates and tests: ``{"layout": ..., "train_split": ..., ...}`` (for headers)."""
        record = {"layout": self.layout}
        for role in ("train", "val", "test"):
            split = self.role(role)
            if split is not None:
                record[f"{role}_split"] = split.name or str(split.root)
        return record

    def describe(self) -> str:
        """One line for the command's header: ``cub layout: train is_train=1 (5,994 images), val ...``."""
        parts = []
        for role in ("train", "val", "test"):
            split = self.role(role)
            if split is not None and (role != "test" or split is not self.val):
                label = f"val+test {split.name}" if role == "val" and split is self.test else f"{role} {split.name}"
                parts.append(f"{label} ({len(split.samples):,} images)")
        return f"{self.layout} layout: " + ", ".join(parts)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def _is_file(path: Path) -> bool:
    """A file, or a link to one that may be dangling: it is an image the user put there, reported if unreadable."""
    return path.is_file() or (path.is_symlink() and not path.is_dir())


def _images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p) and _is_file(p))


def scan_split(root: Path, classes: list[str] | None = None, name: str = "") -> ImageSplit:
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
        return ImageSplit(root, samples, list(names), name or root.name)
    flat = sorted(p for p in root.iterdir() if _is_file(p) and _is_image(p))
    if not flat:
        raise DataError(f"no images found in {root} (looked for {', '.join(IMG_EXTENSIONS)})")
    return ImageSplit(root, [(p, UNLABELED) for p in flat], [], name or root.name)


def is_dataset_spec(data: str | os.PathLike) -> bool:
    """A timm dataset name (``hfds/NAME``, ``torch/NAME@ROOT``, ...) rather than a local path."""
    text = str(data)
    return text.lower().startswith(TIMM_PREFIXES) and not Path(text).expanduser().exists()


def data_location(data: str | os.PathLike) -> str:
    """What a file's provenance records for ``--data``: the absolute path, or the timm spec with an absolute root."""
    text = str(data)
    if is_dataset_spec(text):
        name, at, root = text.partition("@")
        return f"{name}@{Path(root).expanduser().resolve()}" if at else name
    return str(Path(text).expanduser().resolve())


def data_exists(data: str | os.PathLike) -> bool:
    """``--data`` names something that can be read: an existing path, or a timm spec."""
    return is_dataset_spec(data) or Path(str(data)).expanduser().exists()


def discover(data_dir: str | os.PathLike, dataset_format: str = "auto") -> ImageFolder:
    """Find the layout of ``data_dir`` and list its images.

    Args:
        data_dir: a folder, a ``.tar`` of class folders, or a timm dataset spec (module docstring); an
            :class:`ImageFolder` is returned as it is.
        dataset_format: one of :data:`DATASET_FORMATS`; ``auto`` detects it from the folder.

    Raises:
        DataError: the folder is missing or holds no images, a split file has a bad line (file and line named), a
            training image is also an evaluation image, or the folder matches two published layouts.
    """
    if isinstance(data_dir, ImageFolder):  # already discovered (the command line lists the data before the model)
        return data_dir
    folder = _discover(data_dir, dataset_format)
    folder.location = data_location(data_dir)
    return folder


def _discover(data_dir: str | os.PathLike, dataset_format: str) -> ImageFolder:
    from . import layouts

    if dataset_format not in DATASET_FORMATS:
        raise DataError(f"unknown --dataset-format {dataset_format!r}; expected one of {', '.join(DATASET_FORMATS)}")
    text = str(data_dir)
    root = Path(text).expanduser()
    if dataset_format == "timm" or is_dataset_spec(text) or (root.is_file() and root.suffix.lower() == ".tar"):
        train, val = timm_splits(text)
        splits = {s.name: ImageSplit(Path(text), s.samples, s.classes, s.name) for s in (train, val) if s is not None}
        chosen = splits.get(val.name) if val is not None else None
        return ImageFolder(splits[train.name], chosen, chosen, "timm", splits)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a directory")
    recover(root)  # a group write killed half-way in the folder reads as all old (outputs.py)
    kind = dataset_format
    if kind == "auto":
        found = layouts.detect(root)
        if len(found) > 1:
            raise DataError(
                f"{root} holds the split files of several layouts ({', '.join(found)}); pass --dataset-format "
                f"{found[0]} (or {' or '.join(found[1:])}) to say which splits to use"
            )
        kind = found[0] if found else "folder"
    if kind != "folder":
        return _listed_folder(root, layouts.read_layout(root, kind))
    if (root / "train").is_dir():
        train = scan_split(root / "train")
        val = None
        for name in VAL_SPLITS:
            if (root / name).is_dir():
                val = scan_split(root / name, classes=train.classes if train.labeled else None)
                break
        test = val if val is not None and val.root.name == "test" else None
        if test is None and (root / "test").is_dir():
            test = scan_split(root / "test", classes=train.classes if train.labeled else None)
        splits = {s.name: s for s in (train, val, test) if s is not None}
        return ImageFolder(train, val, test, "folder", splits)
    train = scan_split(root, name="all")
    return ImageFolder(train, None, None, "folder", {"all": train})


def _listed_folder(root: Path, layout: Layout) -> ImageFolder:
    splits = {name: ImageSplit(root, s.samples, list(layout.classes), name) for name, s in layout.splits.items()}
    roles = {role: splits[name] for role, name in layout.roles.items()}
    return ImageFolder(roles["train"], roles.get("val"), roles.get("test"), layout.kind, splits)


def check_selectable(folder: ImageFolder) -> None:
    """Refuse, before any model is built, data a selection would misread: one class, or a dataset's image folder
    given instead of the dataset (``CUB_200_2011/images``: it would select, and later train, on test images).

    Raises:
        DataError: with the fix.
    """
    from .layouts import detect, downloaded_parent

    root = Path(folder.location or folder.train.root)
    if folder.layout == "folder" and root.is_dir():
        parent = downloaded_parent(root)
        if parent is not None:
            raise DataError(
                f"{root} is the image folder of a {parent} dataset as downloaded (its split files are in "
                f"{root.parent}); pass the folder itself: --data {root.parent}, so its train / test split is used"
            )
    split = folder.train
    if split.labeled and len(split.classes) == 1:
        name = split.classes[0]
        inner = Path(split.root) / name
        found = detect(inner) if inner.is_dir() else []
        hint = f" (it holds the split files of a {found[0]} dataset: pass --data {inner})" if found else ""
        raise DataError(
            f"{split.root} has only one class folder ({name}){hint}; a dataset needs a folder of class folders "
            f"(DIR/<class>/<images>), a published layout (CUB_200_2011 as downloaded, VTAB-1k, FGVC JSON), or, for "
            "--method fps, images directly in DIR"
        )


def training_folder(
    data_dir: str | os.PathLike | ImageFolder | None,
    recorded: Mapping[str, Any],
    source: str,
    dataset_format: str = "auto",
) -> ImageFolder:
    """The labelled data ``fps train`` / ``fps eval`` read: ``data_dir``, or the data (and the layout) a mask or
    delta records.

    Raises:
        DataError: nothing recorded and nothing given, the recorded data is gone, or the data has no labels or a
            single class.
    """
    if data_dir is None:
        data_dir = recorded.get("data")
        if not data_dir:
            raise DataError(f"{source} records no data folder; pass --data DIR")
        if not data_exists(data_dir):
            raise DataError(f"data folder {data_dir} recorded in {source} does not exist; pass --data DIR")
        if dataset_format == "auto" and recorded.get("layout") in DATASET_FORMATS:
            dataset_format = recorded["layout"]  # the splits the selection used, even where detection is ambiguous
    folder = discover(data_dir, dataset_format)
    if not folder.train.labeled:
        raise DataError(f"{folder.train.root} has no class sub-folders; fine-tuning needs DIR/<class>/<images>")
    if len(folder.train.classes) < 2:
        raise DataError(f"{folder.train.root} has only one class ({folder.train.classes[0]}); training needs two")
    return folder


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
            if hasattr(path, "load"):  # an item of a timm / torchvision dataset (timm_data.DatasetItem)
                img = path.load().convert("RGB")
            else:
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
    return dataset_loader(
        ImageDataset(samples, transform),
        collate,
        batch_size=batch_size,
        num_workers=num_workers,
        pin_memory=pin_memory,
        shuffle=shuffle,
        seed=seed,
        drop_last=drop_last,
        batches=batches,
        sampler=sampler,
    )


def dataset_loader(
    dataset: Dataset,
    collate_fn: Callable,
    *,
    batch_size: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    shuffle: bool = False,
    seed: int = 0,
    drop_last: bool = False,
    batches: list[list[int]] | None = None,
    sampler: torch.utils.data.Sampler | None = None,
) -> DataLoader:
    """The DataLoader every task builds: ``batches`` (a rank's shard of fixed batches) wins over ``sampler``, which
    wins over a seeded shuffle.

    Raises:
        DataError: ``batch_size`` below 1.
    """
    if batch_size < 1:
        raise DataError(f"--batch-size must be at least 1, got {batch_size}")
    common = dict(num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory, persistent_workers=False)
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
