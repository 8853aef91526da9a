"""``--data`` as a timm dataset spec: what :func:`timm.data.create_dataset` reads, listed as fps's samples.

Specs: a ``.tar`` of class folders (timm's tar reader), ``hfds/NAME`` (a Hugging Face dataset, from the local
cache under ``HF_HOME`` or at ``hfds/NAME@CACHE_DIR``), ``torch/NAME@ROOT`` (a torchvision dataset already in
``ROOT``: ``cifar10``, ``cifar100``, ``mnist``, ``folder``, ... never downloaded by fps). The part after ``@`` is
timm's ``root`` argument (train.py's ``data_dir``).

Each sample is a :class:`DatasetItem` (the dataset and an index) instead of a path, so subsets, shards and loaders
work as for a folder. Streamed datasets (``hfids/``, ``wds/``, ``tfds/``) have no length and no random access, which
fps's shards and ``--max-samples`` need: they are refused with a message saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import DataError

# timm dataset names with a prefix (timm.data.create_dataset); a spec is told from a path by its prefix.
TIMM_PREFIXES = ("hfds/", "hfids/", "wds/", "tfds/", "torch/")
STREAMED = ("hfids/", "wds/", "tfds/")
TRAIN_SPLIT = "train"
EVAL_SPLITS = ("validation", "val", "test")


@dataclass
class TimmSplit:
    """One split of a timm dataset: ``samples`` are ``(DatasetItem, class index)``."""

    name: str
    samples: list[tuple[DatasetItem, int]]
    classes: list[str]


@dataclass(frozen=True)
class DatasetItem:
    """One image of a timm / torchvision dataset: ``load()`` decodes it; ``str()`` names it in messages."""

    dataset: Any
    index: int
    name: str

    def load(self) -> Any:
        return self.dataset[self.index][0]  # a PIL image: the dataset is built without a transform

    def __str__(self) -> str:
        return self.name


def timm_splits(spec: str) -> tuple[TimmSplit, TimmSplit | None]:
    """The training split of a timm dataset spec and its validation split, when it has its own.

    Raises:
        DataError: a streamed dataset, a dataset that is not there (not downloaded), a missing extra, or a
            validation split sharing images with the training split.
    """
    name, _, root = spec.partition("@")
    if not name.lower().startswith(TIMM_PREFIXES):  # a folder or a tar: timm's root, with an empty dataset name
        name, root = "", spec
    if name.lower().startswith(STREAMED):
        raise DataError(
            f"--data {spec}: a streamed dataset ({name.split('/')[0]}/) has no length and no random access, which "
            "fps needs to shard and subsample it; use hfds/NAME (the same Hugging Face dataset, random access) or "
            "extract the shards into class folders"
        )
    if name.lower().startswith("torch/") and not root:
        raise DataError(f"--data {spec}: a torchvision dataset needs its folder: --data {name}@ROOT")
    root_path = str(Path(root).expanduser()) if root else None
    train = _split(spec, name, root_path, TRAIN_SPLIT)
    if train is None:
        raise DataError(f"--data {spec}: no {TRAIN_SPLIT} split")
    val = None
    if name or Path(root_path).is_dir():  # a named dataset or a folder; a tar holds one split
        for split in EVAL_SPLITS:
            val = _split(spec, name, root_path, split, required=False)
            if val is not None:
                break
    if val is not None:
        seen = {str(item) for item, _ in train.samples}
        shared = [str(item) for item, _ in val.samples if str(item) in seen]
        if len(shared) == len(val.samples) == len(train.samples):
            val = None  # no split of its own: timm fell back to the same images
        elif shared:
            raise DataError(
                f"--data {spec}: {shared[0]} is in the {train.name} and the {val.name} split; train and evaluation "
                "must not share images"
            )
    return train, val


def _split(spec: str, name: str, root: str | None, split: str, required: bool = True) -> TimmSplit | None:
    """One split, its samples :class:`DatasetItem` (``None``: not there and not ``required``)."""
    try:
        from timm.data import create_dataset

        dataset = create_dataset(name, root=root, split=split, is_training=split == TRAIN_SPLIT, download=False)
    except ImportError as e:
        raise DataError(f"--data {spec} needs the {e.name} package (pip install {e.name})") from None
    except Exception as e:  # timm / torchvision / datasets each raise their own kinds
        if not required:
            return None
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(f"--data {spec}: timm cannot read the {split} split: {reason}") from None
    if name.lower().startswith("torch/") and split != TRAIN_SPLIT:
        # torchvision's basic datasets have two splits (train and test): every eval name gives the test split.
        split = "test"
    labels = _labels(dataset)
    if not labels:
        if required:
            raise DataError(f"--data {spec}: the {split} split holds no images")
        return None
    names = _names(dataset, labels)
    samples = [(DatasetItem(dataset, i, _item_name(spec, dataset, split, i)), label) for i, label in enumerate(labels)]
    return TimmSplit(split, samples, names)


def _labels(dataset: Any) -> list[int]:
    """Every item's class index, read from the reader's listing (no image is decoded where timm lists targets)."""
    reader = getattr(dataset, "reader", None)
    if reader is not None and getattr(reader, "targets", None) is not None:
        return [int(t) for t in reader.targets]
    if reader is not None and isinstance(getattr(reader, "samples", None), list):
        return [int(sample[1]) for sample in reader.samples]
    if reader is not None and hasattr(reader, "dataset") and getattr(reader, "label_key", None):
        return [int(t) for t in reader.dataset[reader.label_key]]
    if getattr(dataset, "targets", None) is not None:
        return [int(t) for t in dataset.targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def _names(dataset: Any, labels: list[int]) -> list[str]:
    """Class names by index: the reader's or dataset's mapping, its ``classes``, else the indices themselves."""
    reader = getattr(dataset, "reader", None)
    mapping = None
    for holder, attr in ((reader, "class_to_idx"), (reader, "class_name_to_idx"), (dataset, "class_to_idx")):
        if holder is not None and isinstance(getattr(holder, attr, None), dict) and getattr(holder, attr):
            mapping = getattr(holder, attr)
            break
    if mapping:
        return [name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1])]
    classes = getattr(dataset, "classes", None)
    if classes:
        return [str(c) for c in classes]
    return [str(i) for i in range(max(labels) + 1)]


def _item_name(spec: str, dataset: Any, split: str, index: int) -> str:
    try:
        return f"{spec}:{split}:{dataset.filename(index)}"
    except Exception:  # torchvision datasets have no filename(); name the item by index
        samples = getattr(dataset, "samples", None)
        if isinstance(samples, list) and index < len(samples) and isinstance(samples[index], tuple):
            return str(samples[index][0])
        return f"{spec}:{split}[{index}]"
