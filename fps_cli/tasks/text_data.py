"""Labelled text for text classification: discovery, parsing and splits of ``--data``.

Layouts, in the order they are tried:

- a file: ``*.jsonl`` (JSON Lines, one object per line), ``*.csv`` / ``*.tsv`` (a header row), with the fields
  ``text`` and ``label`` (``--text-field``, ``--label-field``; ``--text-pair-field`` adds a second text for sentence
  pairs). ``--val-split F`` carves a seeded fraction ``F`` of it out as the validation split.
- a folder with ``train.jsonl`` (or ``.csv`` / ``.tsv``) and optionally ``val``, ``validation`` or ``test`` of the
  same format (the first found); or a folder holding exactly one such file;
- a folder of class sub-folders of ``.txt`` files, one example per file (``DIR/<class>/*.txt``), or ``DIR/train/``
  and ``DIR/val/`` of them, as for images.

Classes are the sorted label values (numerically when every label is an integer, so labels ``0..N-1`` keep their
index). A validation label that training never saw, a line that does not parse, a missing field, a text that is not
a string or an empty file is a :class:`~fps_cli.errors.DataError` naming the file and line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..data import VAL_SPLITS
from ..errors import DataError

TEXT_FILE_SUFFIXES = (".jsonl", ".csv", ".tsv")
DEFAULT_TEXT_FIELD = "text"
DEFAULT_LABEL_FIELD = "label"
SPLIT_SEED = 0  # --val-split carves the same validation examples in select, train and eval


@dataclass(frozen=True)
class Example:
    """One labelled text: ``text`` (and ``pair`` for sentence pairs), and where it was read (``file:line``)."""

    text: str
    pair: str | None
    label: Any
    where: str


@dataclass
class TextSplit:
    """One split of a text dataset, shaped like :class:`fps_cli.data.ImageSplit`.

    Attributes:
        root: the file or folder it was read from.
        samples: ``(Example, class index)``, in file order.
        classes: class names, as strings.
    """

    root: Path
    samples: list[tuple[Example, int]]
    classes: list[str]
    name: str = ""

    @property
    def labeled(self) -> bool:
        return bool(self.classes)


@dataclass(frozen=True)
class Fields:
    """Which fields of a record hold the text, the optional second text and the label."""

    text: str = DEFAULT_TEXT_FIELD
    label: str = DEFAULT_LABEL_FIELD
    pair: str | None = None


def fields_of(options: Mapping[str, Any]) -> Fields:
    return Fields(
        options.get("text_field") or DEFAULT_TEXT_FIELD,
        options.get("label_field") or DEFAULT_LABEL_FIELD,
        options.get("text_pair_field"),
    )


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def _flag(field: str, fields: Fields) -> str:
    if field == fields.text:
        return "--text-field"
    if field == fields.label:
        return "--label-field"
    return "--text-pair-field"


def _example(record: Mapping[str, Any], fields: Fields, where: str) -> Example:
    wanted = [fields.text, *([fields.pair] if fields.pair else []), fields.label]
    for name in wanted:
        if name not in record:
            have = ", ".join(sorted(map(str, record))) or "none"
            raise DataError(f"{where}: no field {name!r} (fields: {have}); name the field with {_flag(name, fields)}")
    for name in wanted[:-1]:
        if not isinstance(record[name], str):
            raise DataError(f"{where}: field {name!r} is {_kind(record[name])}, not a string")
    label = record[fields.label]
    if isinstance(label, bool) or not isinstance(label, (str, int)):
        raise DataError(f"{where}: label field {fields.label!r} is {_kind(label)}; a label is a string or an integer")
    return Example(record[fields.text], record[fields.pair] if fields.pair else None, label, where)


def _read_jsonl(path: Path, fields: Fields) -> list[Example]:
    examples = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno}); a JSON Lines file holds one "
                    "object per line"
                ) from None
            if not isinstance(record, dict):
                raise DataError(f"{path}:{number}: a JSON object expected, got {_kind(record)}")
            examples.append(_example(record, fields, f"{path}:{number}"))
    return examples


def _read_csv(path: Path, fields: Fields) -> list[Example]:
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    examples = []
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        for record in reader:
            if not any((v or "").strip() for v in record.values() if isinstance(v, str)):
                continue
            label = record.get(fields.label)
            if isinstance(label, str) and label.strip().lstrip("-").isdigit():
                record[fields.label] = int(label)  # CSV has no types: integer labels keep their numeric order
            examples.append(_example(record, fields, f"{path}:{reader.line_num}"))
    return examples


def read_examples(path: Path, fields: Fields) -> list[Example]:
    """Every example of a JSON Lines or CSV / TSV file.

    Raises:
        DataError: a line that does not parse, a missing field, a text that is not a string, an empty file.
    """
    try:
        examples = _read_csv(path, fields) if path.suffix.lower() in (".csv", ".tsv") else _read_jsonl(path, fields)
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}") from None
    if not examples:
        raise DataError(f"{path} is empty: it holds no examples")
    return examples


def _class_names(labels: list[Any]) -> list[str]:
    if all(isinstance(v, int) for v in labels):
        return [str(v) for v in sorted(set(labels))]
    return sorted({str(v) for v in labels})


def _split(root: Path, examples: list[Example], classes: list[str] | None, train_root: Path | None) -> TextSplit:
    names = classes if classes is not None else _class_names([e.label for e in examples])
    index = {name: i for i, name in enumerate(names)}
    samples = []
    for e in examples:
        if str(e.label) not in index:
            raise DataError(
                f"{e.where}: label {e.label!r} never appears in the training split {train_root} (its classes: "
                f"{', '.join(names[:10])}{' ...' if len(names) > 10 else ''}); drop such examples, or add them to "
                "training"
            )
        samples.append((e, index[str(e.label)]))
    return TextSplit(root, samples, list(names), root.name)


def _text_folder(root: Path, classes: list[str] | None, train_root: Path | None) -> TextSplit:
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    examples = []
    for d in subdirs:
        for p in sorted(d.rglob("*.txt")):
            if p.is_file() and not p.name.startswith("."):
                try:
                    text = p.read_text(encoding="utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{p} is not UTF-8 text ({e.reason} at byte {e.start})") from None
                examples.append(Example(text.strip(), None, d.name, str(p)))
    if not examples:
        raise DataError(
            f"no text found in {root}: expected train.jsonl (or .csv / .tsv), a .jsonl / .csv file, or class "
            "sub-folders of .txt files"
        )
    return _split(root, examples, classes, train_root)


def _data_file(folder: Path, stem: str) -> Path | None:
    for suffix in TEXT_FILE_SUFFIXES:
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def carve(examples: list[Example], fraction: float, seed: int = SPLIT_SEED) -> tuple[list[Example], list[Example]]:
    """A seeded split into (train, validation): ``round(fraction * n)`` examples (at least one) go to validation;
    both keep file order."""
    import torch

    n = len(examples)
    n_val = max(1, round(fraction * n))
    if n_val >= n:
        raise DataError(f"--val-split {fraction:g} of {n} examples leaves none for training; use a smaller fraction")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = set(order[:n_val])
    return [e for i, e in enumerate(examples) if i not in val], [e for i, e in enumerate(examples) if i in val]


def discover_text(path: str | Path, options: Mapping[str, Any]) -> tuple[TextSplit, TextSplit | None, dict[str, Any]]:
    """The training and validation splits of ``--data`` and where they came from.

    Args:
        path: a file or a folder (see the module docstring).
        options: ``text_field``, ``label_field``, ``text_pair_field``, ``val_split`` (``None``: defaults).

    Raises:
        DataError: no such file or folder, nothing readable in it, or a problem in a file (file and line named).
    """
    root = Path(path).expanduser()
    fields = fields_of(options)
    val_split = options.get("val_split")
    if not root.exists():
        raise DataError(f"data {root} does not exist")
    train_file = val_file = None
    if root.is_file():
        if root.suffix.lower() not in TEXT_FILE_SUFFIXES:
            raise DataError(f"{root} is not a JSON Lines or CSV file (expected {', '.join(TEXT_FILE_SUFFIXES)})")
        train_file = root
    else:
        train_file = _data_file(root, "train")
        if train_file is not None:
            val_file = next((f for f in (_data_file(root, s) for s in VAL_SPLITS) if f is not None), None)
        else:
            files = sorted(p for p in root.iterdir() if p.is_file() and p.suffix.lower() in TEXT_FILE_SUFFIXES)
            if len(files) == 1:
                train_file = files[0]
            elif len(files) > 1:
                names = ", ".join(p.name for p in files[:5])
                raise DataError(
                    f"{root} holds several data files ({names}); name the training file train.jsonl (and the "
                    "validation file validation.jsonl), or pass one file as --data"
                )

    if train_file is not None:
        examples = read_examples(train_file, fields)
        val_examples = read_examples(val_file, fields) if val_file is not None else None
        if val_split is not None:
            if val_examples is not None:
                raise DataError(f"{root} has a validation file {val_file.name}; --val-split carves one from one file")
            examples, val_examples = carve(examples, val_split)
        train = _split(train_file, examples, None, train_file)
        val = _split(val_file or train_file, val_examples, train.classes, train_file) if val_examples else None
        provenance = {"layout": train_file.suffix.lower()[1:], "train_split": str(train_file.resolve())}
        if val is not None:
            provenance["val_split"] = str((val_file or train_file).resolve())
        if val_split is not None:
            provenance.update(carved=val_split, split_seed=SPLIT_SEED)
        return train, val, provenance

    if val_split is not None:
        raise DataError("--val-split carves a validation split from one JSON Lines or CSV file, not from a folder")
    if (root / "train").is_dir():
        train = _text_folder(root / "train", None, root / "train")
        val_dir = next((root / s for s in VAL_SPLITS if (root / s).is_dir()), None)
        val = _text_folder(val_dir, train.classes, root / "train") if val_dir is not None else None
        record = {"layout": "text-folders", "train_split": str((root / "train").resolve())}
        if val is not None:
            record["val_split"] = str(val_dir.resolve())
        return train, val, record
    return _text_folder(root, None, root), None, {"layout": "text-folders", "train_split": str(root.resolve())}
