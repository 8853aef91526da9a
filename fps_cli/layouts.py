"""Image datasets in the layouts they are published in (DESIGN.md section 3), read as lists of (path, label).

- ``cub``: CUB_200_2011 as downloaded: ``images/<class>/...``, ``images.txt`` (``id path``),
  ``image_class_labels.txt`` (``id label``, 1-based), ``train_test_split.txt`` (``id is_train``), ``classes.txt``
  (``label name``). Trains on ``is_train=1``, validates (and tests) on ``is_train=0``: the official split.
- ``vtab``: the VTAB-1k folders NOAH, GPS and their predecessors use: list files of ``path label`` lines, paths
  relative to the folder: ``train800.txt``, ``val200.txt``, ``train800val200.txt``, ``test.txt`` (or
  ``test800.txt``). Trains on ``train800val200.txt`` and validates on ``test.txt``, as GPS reports VTAB-1k
  (``fps eval --split val200`` and the other list names are there too).
- ``fgvc-json``: the FGVC split files of VPT and GPS (CUB, NABirds, Oxford Flowers, Stanford Dogs, Stanford Cars):
  ``train.json``, ``val.json``, ``test.json``, each ``{"relative/path.jpg": class_id}``, paths relative to the
  dataset's image folder (``images/``, ``Images/`` or the folder itself, as VPT's ``JSONDataset`` looks them up).
  As GPS's ``FGVC`` dataset: the class ids of all files, sorted, become 0..C-1; it trains on ``train.json`` and
  ``val.json`` together (the split ``train.json+val.json``) and validates and tests on ``test.json``; each file is
  also a split of its own name (``fps eval --split val.json``).

Every problem names the file and line (``images.txt:12: ...``); an image listed for training and for evaluation is
an error, never a silent overlap.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError

CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt")
VTAB_LISTS = ("train800.txt", "val200.txt", "train800val200.txt", "test.txt", "test800.txt")
FGVC_JSON = ("train.json", "val.json", "test.json")
# Class counts of the VTAB-1k tasks (NOAH's table), by folder name: a label at or past the count is unknown.
VTAB_CLASSES = {
    "cifar": 100,
    "caltech101": 102,
    "dtd": 47,
    "oxford_flowers102": 102,
    "oxford_iiit_pet": 37,
    "svhn": 10,
    "sun397": 397,
    "patch_camelyon": 2,
    "eurosat": 10,
    "resisc45": 45,
    "diabetic_retinopathy": 5,
    "clevr_count": 8,
    "clevr_dist": 6,
    "dmlab": 6,
    "kitti": 4,
    "dsprites_loc": 16,
    "dsprites_ori": 16,
    "smallnorb_azi": 18,
    "smallnorb_ele": 9,
}


@dataclass
class ListedSplit:
    """One split of a published layout.

    Attributes:
        name: the split's own name (``train800val200``, ``is_train=1``, ``train.json``).
        samples: (image path, class index).
        lines: where each sample was listed (``file:line``), for the error naming an overlap.
    """

    name: str
    samples: list[tuple[Path, int]]
    lines: list[str]


@dataclass
class Layout:
    """A dataset read from its split files.

    Attributes:
        kind: ``cub``, ``vtab`` or ``fgvc-json``.
        classes: class names, by index.
        splits: every split the files define, by name.
        roles: which split trains, validates and tests (``train``, ``val``, ``test`` -> a name in ``splits``).
    """

    kind: str
    classes: list[str]
    splits: dict[str, ListedSplit]
    roles: dict[str, str]


def detect(root: Path) -> list[str]:
    """The published layouts whose files ``root`` holds (more than one: ambiguous, ``--dataset-format`` decides)."""
    found = []
    if all((root / name).is_file() for name in CUB_FILES):
        found.append("cub")
    lists = {name for name in VTAB_LISTS if (root / name).is_file()}
    if lists & {"train800.txt", "train800val200.txt"} and lists & {"test.txt", "test800.txt"}:
        found.append("vtab")
    if (root / "train.json").is_file() and ((root / "test.json").is_file() or (root / "val.json").is_file()):
        found.append("fgvc-json")
    return found


def downloaded_parent(root: Path) -> str | None:
    """The layout ``root``'s parent folder is in when ``root`` is its image folder (``CUB_200_2011/images``)."""
    found = detect(root.parent) if root.name.lower() in ("images", "jpg") else []
    return found[0] if found else None


def read_layout(root: Path, kind: str) -> Layout:
    """Read the split files of a ``kind`` dataset in ``root``.

    Raises:
        DataError: a file is missing, or a line names a missing image, an unknown id or label, or an image that is
            both in a training and an evaluation split (file and line named).
    """
    reader = {"cub": _read_cub, "vtab": _read_vtab, "fgvc-json": _read_fgvc_json}[kind]
    layout = reader(root)
    _check_disjoint(layout)
    return layout


def _lines(path: Path) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of each non-blank line of a whitespace-separated list file."""
    if not path.is_file():
        raise DataError(f"{path} is missing")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, line.split()


def _id_table(path: Path, what: str) -> dict[str, tuple[str, int]]:
    """``id -> (value, line)`` of a two-column CUB file; a line that is not ``id value`` or repeats an id is an
    error."""
    table: dict[str, tuple[str, int]] = {}
    for number, fields in _lines(path):
        if len(fields) != 2:
            raise DataError(f"{path}:{number}: expected '<image id> <{what}>', got {' '.join(fields)!r}")
        image_id, value = fields
        if image_id in table:
            raise DataError(
                f"{path}:{number}: image id {image_id} is listed again (first on line {table[image_id][1]})"
            )
        table[image_id] = (value, number)
    return table


def _read_cub(root: Path) -> Layout:
    images_txt, labels_txt, split_txt = (root / name for name in CUB_FILES)
    paths = _id_table(images_txt, "path")
    labels = _id_table(labels_txt, "class id")
    is_train = _id_table(split_txt, "is_train")
    names: dict[int, str] = {}
    if (root / "classes.txt").is_file():
        for number, fields in _lines(root / "classes.txt"):
            if len(fields) != 2 or not fields[0].isdigit():
                raise DataError(f"{root / 'classes.txt'}:{number}: expected '<class id> <name>'")
            names[int(fields[0])] = fields[1]
    train = ListedSplit("is_train=1", [], [])
    test = ListedSplit("is_train=0", [], [])
    for image_id, (relative, number) in paths.items():
        path = root / "images" / relative
        if not path.is_file():
            raise DataError(f"{images_txt}:{number}: {path} does not exist")
        if image_id not in labels:
            raise DataError(f"{images_txt}:{number}: image id {image_id} has no line in {labels_txt}")
        if image_id not in is_train:
            raise DataError(f"{images_txt}:{number}: image id {image_id} has no line in {split_txt}")
        label, label_line = labels[image_id]
        if not label.isdigit() or int(label) < 1 or (names and int(label) not in names):
            known = f" (classes.txt lists 1..{max(names)})" if names else " (class ids start at 1)"
            raise DataError(f"{labels_txt}:{label_line}: unknown class id {label!r}{known}")
        flag, split_line = is_train[image_id]
        if flag not in ("0", "1"):
            raise DataError(f"{split_txt}:{split_line}: is_train must be 0 or 1, got {flag!r}")
        into = train if flag == "1" else test
        into.samples.append((path, int(label) - 1))
        into.lines.append(f"{split_txt}:{split_line}")
    count = max(names) if names else max((label for _, label in train.samples + test.samples), default=-1) + 1
    # Without classes.txt, a class is named after its image folder (001.Black_footed_Albatross), as CUB names them.
    by_label = {label: path.parent.name for path, label in train.samples + test.samples}
    classes = [names.get(i + 1, by_label.get(i, str(i + 1))) for i in range(count)]
    for split in (train, test):
        _sort(split)
    roles = {"train": "is_train=1", "val": "is_train=0", "test": "is_train=0"}
    return Layout("cub", classes, {"is_train=1": train, "is_train=0": test}, roles)


def _read_vtab(root: Path) -> Layout:
    limit = VTAB_CLASSES.get(root.name)
    splits: dict[str, ListedSplit] = {}
    for name in VTAB_LISTS:
        path = root / name
        if not path.is_file():
            continue
        split = ListedSplit(path.stem, [], [])
        for number, fields in _lines(path):
            if len(fields) < 2:
                raise DataError(f"{path}:{number}: expected '<image path> <label>', got {' '.join(fields)!r}")
            relative, label = " ".join(fields[:-1]), fields[-1]
            if not label.isdigit() or (limit is not None and int(label) >= limit):
                known = f" ({root.name} has labels 0..{limit - 1})" if limit is not None else " (labels are 0, 1, ...)"
                raise DataError(f"{path}:{number}: unknown label {label!r}{known}")
            image = root / relative
            if not image.is_file():
                raise DataError(f"{path}:{number}: {image} does not exist")
            split.samples.append((image, int(label)))
            split.lines.append(f"{path.name}:{number}")
        _sort(split)
        splits[split.name] = split
    test = "test" if "test" in splits else "test800"
    train = "train800val200" if "train800val200" in splits else "train800"
    count = limit or max(label for split in splits.values() for _, label in split.samples) + 1
    return Layout("vtab", [str(i) for i in range(count)], splits, {"train": train, "val": test, "test": test})


def _read_fgvc_json(root: Path) -> Layout:
    splits: dict[str, ListedSplit] = {}
    image_root: Path | None = None
    for name in FGVC_JSON:
        path = root / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8")
        try:
            entries = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(entries, dict):
            raise DataError(f'{path}:1: expected an object {{"relative/path.jpg": class_id, ...}}')
        split = ListedSplit(path.name, [], [])
        for relative, label in entries.items():
            number = _json_line(text, relative)
            if image_root is None:
                image_root = _fgvc_image_root(root, relative)
            if not isinstance(label, int) or isinstance(label, bool) or label < 0:
                raise DataError(f"{path}:{number}: unknown label {label!r} for {relative} (class ids are 0, 1, ...)")
            image = (image_root or root) / relative
            if not image.is_file():
                raise DataError(f"{path}:{number}: {image} does not exist")
            split.samples.append((image, label))
            split.lines.append(f"{path.name}:{number}")
        _sort(split)
        splits[path.name] = split  # train.json: the file's name, apart from the roles train / val / test
    if "train.json" not in splits:
        raise DataError(f"{root / 'train.json'} is missing")
    # GPS's FGVC dataset: class ids of all the files, sorted, mapped to 0..C-1; train on train + val, test on test.
    ids = sorted({label for split in splits.values() for _, label in split.samples})
    index = {class_id: i for i, class_id in enumerate(ids)}
    for split in splits.values():
        split.samples = [(path, index[label]) for path, label in split.samples]
    parts = [name for name in ("train.json", "val.json") if name in splits]
    trainval = ListedSplit(
        "+".join(parts),
        [sample for name in parts for sample in splits[name].samples],
        [line for name in parts for line in splits[name].lines],
    )
    _sort(trainval)
    named = {**splits, trainval.name: trainval}
    evaluate = "test.json" if "test.json" in splits else "val.json"
    roles = {"train": trainval.name, "val": evaluate, "test": evaluate}
    if evaluate == "val.json":  # no test.json: train on train.json alone, validate on val.json
        roles["train"] = "train.json"
    return Layout("fgvc-json", [str(i) for i in ids], named, roles)


def _fgvc_image_root(root: Path, relative: str) -> Path | None:
    """The folder VPT's ``JSONDataset`` resolves paths against: the first of ``images/``, ``Images/``, the folder
    itself, where the first listed image exists."""
    for folder in (root / "images", root / "Images", root):
        if (folder / relative).is_file():
            return folder
    return None


def _json_line(text: str, key: str) -> int:
    """The line of ``text`` where the key ``key`` first appears (1 when not found)."""
    at = text.find(json.dumps(key))
    return text.count("\n", 0, at) + 1 if at >= 0 else 1


def _sort(split: ListedSplit) -> None:
    order = sorted(range(len(split.samples)), key=lambda i: split.samples[i][0])
    split.samples = [split.samples[i] for i in order]
    split.lines = [split.lines[i] for i in order]


def _check_disjoint(layout: Layout) -> None:
    """Train and evaluation never share an image (a file listed in both is an error naming both lines)."""
    train = layout.splits[layout.roles["train"]]
    where = {path.resolve(): line for (path, _), line in zip(train.samples, train.lines, strict=True)}
    for role in ("val", "test"):
        split = layout.splits[layout.roles[role]]
        for (path, _), line in zip(split.samples, split.lines, strict=True):
            if path.resolve() in where:
                raise DataError(
                    f"{line}: {path} is also a training image ({where[path.resolve()]}); train and evaluation "
                    "must not share images: fix the split file"
                )
