"""Tiny text models and made-up text for the text-classification tests: no download, seconds to build.

``tiny_bert(folder)`` saves a randomly initialised 2-layer BERT (``BertModel``, as sentence-transformers save their
encoders) with a ``BertTokenizerFast`` built from a vocab.txt written here; ``write_jsonl`` / ``write_text_folder``
write a separable two- or three-class task whose classes use disjoint words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "animal": ["cat", "dog", "bird", "horse", "fish", "mouse", "lion", "wolf"],
    "food": ["bread", "apple", "rice", "cheese", "soup", "cake", "pear", "milk"],
    "tool": ["hammer", "saw", "drill", "wrench", "knife", "axe", "spade", "rake"],
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
COMMON = ["the", "a", "of", "and", "is", "with", "small", "big", "old", "new", "red", "green"]


def tiny_bert(folder: Path, *, architectures: list[str] | None = None, tokenizer: bool = True, seed: int = 0) -> Path:
    """A tiny random BERT and its tokenizer saved in ``folder`` (``save_pretrained``); returns ``folder``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = SPECIAL + COMMON + [w for words in WORDS.values() for w in words]
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    torch.manual_seed(seed)
    model = BertModel(config)
    model.save_pretrained(folder)
    if architectures is not None:
        data = json.loads((folder / "config.json").read_text())
        data["architectures"] = architectures
        (folder / "config.json").write_text(json.dumps(data))
    if tokenizer:
        # transformers 5 takes the vocabulary itself (``vocab``); 4 took a vocab.txt path (``vocab_file``).
        ids = {word: i for i, word in enumerate(vocab)}
        try:
            made = BertTokenizerFast(vocab=ids, model_max_length=64)
        except TypeError:
            (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
            made = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"), model_max_length=64)
        made.save_pretrained(folder)
    return folder


def sentence(label: str, rng: random.Random, length: int | None = None) -> str:
    """A made-up sentence: 2-5 words of ``label``'s class, and sometimes one common word among them."""
    words = [rng.choice(WORDS[label]) for _ in range(length if length is not None else rng.randint(2, 5))]
    if rng.random() < 0.5:
        words.insert(rng.randint(0, len(words)), rng.choice(COMMON))
    return " ".join(words)


def examples(labels: list[str], per_class: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = [{"text": sentence(label, rng), "label": label} for label in labels for _ in range(per_class)]
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def text_task(folder: Path, labels: tuple[str, ...] = ("animal", "food"), per_class: int = 12, val: int = 4) -> Path:
    """``folder/train.jsonl`` and ``folder/validation.jsonl`` of a separable task."""
    write_jsonl(folder / "train.jsonl", examples(list(labels), per_class, seed=1))
    write_jsonl(folder / "validation.jsonl", examples(list(labels), val, seed=2))
    return folder


def write_text_folder(folder: Path, labels: tuple[str, ...] = ("animal", "food"), per_class: int = 4) -> Path:
    """Class sub-folders of .txt files, one example per file."""
    rng = random.Random(3)
    for label in labels:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            (folder / label / f"{i}.txt").write_text(sentence(label, rng) + "\n")
    return folder
