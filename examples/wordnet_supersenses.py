"""A few-shot text-classification task from WordNet: noun glosses labelled with their supersense.

Debian's ``wordnet-base`` installs ``/usr/share/wordnet/data.noun``: one synset per line,
``offset lex_filenum ss_type w_cnt word lex_id ... | gloss``. Field 1 (counting from 0) is the number of the
lexicographer file the synset comes from, one of 26 noun supersenses (03 ``noun.Tops`` ... 28 ``noun.time``, in
WordNet's ``lexnames`` order); the gloss follows ``|``. This script writes ``train.jsonl`` and ``validation.jsonl``
(``{"text": gloss, "label": "noun.animal"}``) with a fixed number of glosses per class, seeded, no gloss in both::

    python examples/wordnet_supersenses.py wordnet/ --shots 32 --val 16
    fps select --model hf:MODEL --data wordnet/ ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

DATA_NOUN = Path("/usr/share/wordnet/data.noun")
# WordNet's lexnames, numbers 03-28: the noun lexicographer files (supersenses).
NOUN_LEXNAMES = [
    "noun.Tops", "noun.act", "noun.animal", "noun.artifact", "noun.attribute", "noun.body", "noun.cognition",
    "noun.communication", "noun.event", "noun.feeling", "noun.food", "noun.group", "noun.location", "noun.motive",
    "noun.object", "noun.person", "noun.phenomenon", "noun.plant", "noun.possession", "noun.process",
    "noun.quantity", "noun.relation", "noun.shape", "noun.state", "noun.substance", "noun.time",
]  # fmt: skip
FIRST_NOUN_FILE = 3


def read_glosses(path: Path = DATA_NOUN) -> list[tuple[str, str]]:
    """``(gloss, supersense)`` for every synset of a WordNet ``data.noun`` file (its licence header skipped)."""
    glosses = []
    with path.open(encoding="utf-8") as f:
        for line in f:
            if line.startswith("  ") or "|" not in line:  # the licence header lines start with two spaces
                continue
            fields, gloss = line.split("|", 1)
            supersense = NOUN_LEXNAMES[int(fields.split()[1]) - FIRST_NOUN_FILE]
            glosses.append((gloss.strip(), supersense))
    return glosses


def write_supersenses(
    out: Path, *, shots: int, val: int, source: Path = DATA_NOUN, seed: int = 0, min_count: int | None = None
) -> dict[str, int]:
    """Write ``out/train.jsonl`` (``shots`` glosses per class) and ``out/validation.jsonl`` (``val`` per class).

    Classes with fewer than ``shots + val`` glosses (default ``min_count``) are left out. Returns the class sizes
    written.
    """
    by_class: dict[str, list[str]] = {}
    for gloss, supersense in read_glosses(source):
        by_class.setdefault(supersense, []).append(gloss)
    need = min_count if min_count is not None else shots + val
    rng = random.Random(seed)
    train, validation = [], []
    for supersense in sorted(by_class):
        glosses = by_class[supersense]
        if len(glosses) < need:
            continue
        picked = rng.sample(glosses, shots + val)
        train += [{"text": g, "label": supersense} for g in picked[:shots]]
        validation += [{"text": g, "label": supersense} for g in picked[shots:]]
    rng.shuffle(train)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("validation.jsonl", validation)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return {label: shots for label in sorted({r["label"] for r in train})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--shots", type=int, default=32, help="training glosses per class")
    parser.add_argument("--val", type=int, default=16, help="validation glosses per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--source", type=Path, default=DATA_NOUN)
    args = parser.parse_args()
    classes = write_supersenses(args.out, shots=args.shots, val=args.val, source=args.source, seed=args.seed)
    print(f"{len(classes)} classes x {args.shots} training + {args.val} validation glosses -> {args.out}")


if __name__ == "__main__":
    main()
