"""benchmarks/text_quality.py: WordNet data preparation, the splits, the rate search, and a tiny end-to-end run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import text_quality as tq

LICENSE = [
    "  1 This software and database is being provided to you, the LICENSEE, by  ",
    "  2 Princeton University under the following license.  ",
    "  3   ",
]
WORDS = {
    5: ["a small furry animal that barks", "a large bird that swims", "an insect that stings", "a fish of rivers"],
    13: ["a sweet food made of sugar", "a drink made from grapes", "bread baked with butter", "a fruit of trees"],
    20: ["a tall tree of forests", "a small flowering plant", "a grass of wet fields", "a vine with red flowers"],
}


def synset_line(offset: int, lex: int, gloss: str) -> str:
    return f"{offset:08d} {lex:02d} n 01 word 0 001 @ 00001740 n 0000 | {gloss}  "


def data_noun_lines(per_class: int = 4) -> list[str]:
    lines = list(LICENSE)
    offset = 1000
    for lex, glosses in WORDS.items():
        for k in range(per_class):
            gloss = glosses[k % len(glosses)] + ("" if k < len(glosses) else f" number {k}")
            lines.append(synset_line(offset, lex, gloss + '; "an example sentence"'))
            offset += 1
    return lines


def test_parse_data_noun_skips_the_license_and_cuts_the_examples():
    lines = [*LICENSE, synset_line(1740, 5, 'a dog; a domestic animal; "the dog barked"; "another"')]
    lines.append(synset_line(1741, 13, 'the act of eating: "he ate"'))
    lines.append(synset_line(1742, 3, '"a gloss that is only a quotation"'))
    assert tq.parse_data_noun(lines) == [
        ("noun.animal", "a dog; a domestic animal"),
        ("noun.food", "the act of eating"),
        ("noun.Tops", "a gloss that is only a quotation"),
    ]


def test_parse_data_noun_names_a_bad_line():
    with pytest.raises(ValueError, match="line 4 is not a noun synset line"):
        tq.parse_data_noun([*LICENSE, "00001740 99 n 01 word 0 000 | a gloss"])


def test_splits_are_disjoint_balanced_and_drop_repeated_texts_and_small_classes():
    examples = [(label, f"{label} text {i}") for label in ("a", "b", "c") for i in range(12)]
    examples += [("a", "shared text"), ("b", "shared text")]  # one text in two classes: dropped everywhere
    examples += [("d", f"d text {i}") for i in range(5)]  # too few for 3 + 2 + 4
    splits, available = tq.make_splits(examples, shots=3, val_per_class=2, test_per_class=4)
    assert available == {"a": 12, "b": 12, "c": 12, "d": 5}
    texts = {split: {r["text"] for r in rows} for split, rows in splits.items()}
    assert not texts["train"] & texts["validation"] and not texts["train"] & texts["test"]
    assert not texts["validation"] & texts["test"]
    assert "shared text" not in set().union(*texts.values())
    for split, n in (("train", 3), ("validation", 2), ("test", 4)):
        labels = [r["label"] for r in splits[split]]
        assert sorted(labels) == sorted(["a", "b", "c"] * n)
    again, _ = tq.make_splits(examples, shots=3, val_per_class=2, test_per_class=4)
    assert again == splits  # seeded
    fewer, _ = tq.make_splits(examples, shots=3, val_per_class=2, test_per_class=4, classes=2)
    assert {r["label"] for r in fewer["train"]} == {"a", "b"}


def test_rate_choice_ties_to_the_smaller_rate_and_the_grid_extends_past_a_winning_edge():
    assert tq.best_rate({1e-3: 50.0, 3e-3: 60.0, 1e-2: 60.0}) == 3e-3
    assert tq.extend_grid([1e-3, 3e-3, 1e-2], 1e-2) == pytest.approx(3e-2)
    assert tq.extend_grid([1e-3, 3e-3, 1e-2], 1e-3) == pytest.approx(3e-4)
    assert tq.extend_grid([3e-5, 1e-4, 3e-4], 3e-5) == pytest.approx(1e-5)
    assert tq.extend_grid([1e-3, 3e-3, 1e-2], 3e-3) is None
    grids = {"fps": {1e-3: 50.0, 3e-3: 70.0}, "random": {1e-3: 60.0, 3e-3: 50.0, 1e-2: 90.0}}
    assert tq.shared_rate(grids) == (3e-3, ["fps", "random"])
    grids["gps"] = {1e-3: 99.0, 3e-3: None}  # an unfinished search has no say
    assert tq.shared_rate(grids) == (3e-3, ["fps", "random"])
    assert tq.shared_rate({"gps": {1e-3: None}}) == (None, [])


def test_protocol_extends_the_grid_runs_the_seeds_and_skips_finished_runs(tmp_path):
    # A made-up validation score that peaks beyond the top of random's grid: the search must walk up to it.
    def score(cell: tq.Cell) -> float:
        peak = {"fps": 3e-3, "random": 1e-1}[cell.method]
        return 100.0 - abs(__import__("math").log10(cell.lr / peak))

    computed = []

    def compute(cell: tq.Cell) -> dict:
        computed.append(cell.key)
        return {"key": cell.key, "val_top1": score(cell), "test_top1": score(cell) - cell.seed}

    args = tq.parse_args(["--methods", "fps", "random", "--budgets", "0.01", "--max-extend", "2"])
    runs = tq.Runs(tmp_path / "runs.jsonl")
    rows = tq.run_protocol(args, compute, runs, log=lambda m: None)
    own = {r["method"]: r for r in rows if r["rate"] == "own"}
    assert own["fps"]["lr"] == 3e-3
    assert list(own["fps"]["grid"]) == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2])  # one step below the grid
    assert own["random"]["lr"] == pytest.approx(1e-1)  # past the grid's top (3e-2), and one more to see it peak
    assert list(own["random"]["grid"]) == pytest.approx([3e-3, 1e-2, 3e-2, 1e-1, 3e-1])
    assert [x["key"].rsplit("|", 1)[1] for x in own["fps"]["runs"]] == ["0", "1", "2"]
    shared = {r["method"]: r["lr"] for r in rows if r["rate"] == "shared"}
    assert shared["fps"] == shared["random"] and shared["fps"] in own["random"]["grid"]
    assert all(len(r["runs"]) == 3 for r in rows)
    assert len(computed) == len(set(computed))  # nothing ran twice
    again = tq.run_protocol(args, lambda cell: pytest.fail(f"ran {cell.key} again"), tq.Runs(runs.path))
    assert again == rows


def tiny_bert(folder: Path, words: list[str]) -> Path:
    """A 2-layer random BERT and a word-level tokenizer over ``words``, saved as a from_pretrained folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words))]
    folder.mkdir(parents=True)
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(folder)  # an encoder without a head, like the MiniLM folder
    return folder


def test_smoke_run_gives_each_kind_of_method_a_number_and_writes_the_table(tmp_path, capsys, monkeypatch):
    data_noun = tmp_path / "data.noun"
    data_noun.write_text("\n".join(data_noun_lines(per_class=7)) + "\n")
    words = [*" ".join(g for glosses in WORDS.values() for g in glosses).split(), "number", *map(str, range(7))]
    model = tiny_bert(tmp_path / "bert", words)
    out = tmp_path / "out"
    argv = ["--data-noun", str(data_noun), "--model", str(model), "--out-dir", str(out), "--smoke"]
    # One method of each path: statistics (fps), no statistics (random), gradients (gps), a fixed set (bias), PEFT.
    argv += ["--budgets", "0.2", "0.3", "--max-extend", "0", "--methods", "fps", "random", "gps", "bias", "lora"]
    calls = []

    def in_process(command):  # the cost pass's fresh processes, run here (no interpreter start-up)
        calls.append(command)
        capsys.readouterr()
        tq.main(command[2:])
        return capsys.readouterr().out

    monkeypatch.setattr(tq, "run_worker", in_process)
    text = tq.main(argv)
    runs = tq.read_jsonl(out / "runs.jsonl")
    assert {r["method"] for r in runs} == {"fps", "random", "gps", "bias", "lora"}
    assert all(0 <= r["test_top1"] <= 100 and r["trainable"] > 0 for r in runs)
    assert {r["budget"] for r in runs if r["method"] in tq.SELECTION} == {0.2, 0.3}
    total = json.loads((out / "summary.json").read_text())["total_params"]
    for r in runs:  # the selection methods train exactly their budget
        if r["method"] in tq.SELECTION:
            assert r["trainable"] == round(r["budget"] * total)
    assert (out / "table.md").read_text() == text
    # One cost measurement per (budget, method) of the table, each its own worker; every row shows its figures.
    assert sorted(c[-1] for c in calls) == sorted(c.key for c in tq.cost_cells(tq.parse_args(argv)))
    assert len(calls) == 5 + 3
    costs = tq.read_jsonl(out / "cost.jsonl")
    assert all(c["epochs"] == 1 and c["seconds_per_epoch"] > 0 for c in costs)
    assert "not measured" not in text
    assert "| fps |" in text and "| lora |" in text and "Budget 0.3" in text
    for split in ("train", "validation", "test"):
        assert len(tq.read_jsonl(out / "data" / f"{split}.jsonl")) == 3 * 2
    capsys.readouterr()
    n = len(runs)
    calls.clear()
    assert tq.main(argv) == text  # every run cached: the same table, nothing new
    assert len(tq.read_jsonl(out / "runs.jsonl")) == n and calls == []


def test_a_partial_table_shows_what_was_not_run(tmp_path):
    args = tq.parse_args(["--methods", "fps", "full", "--budgets", "0.01", "--table-only"])
    runs = tq.Runs(tmp_path / "runs.jsonl")
    runs.get(tq.Cell("fps", 0.01, 3e-3, 0), lambda cell: {"key": cell.key, "val_top1": 50.0})
    rows = tq.run_protocol(args, lambda cell: None, runs, log=lambda m: None)
    assert [(r["method"], r["lr"], r["runs"]) for r in rows if r["rate"] == "own"] == [
        ("fps", None, []),
        ("full", None, []),
    ]
    summary = {"classes": ["a", "b"], "sizes": {"train": 4, "validation": 4, "test": 4}, "total_params": 100}
    text = tq.render(rows, summary, args)
    assert "| fps | not run (rate search unfinished) | | - | 0.003: 50.0, 0.01: not run, 0.03: not run |" in text
    assert "| full | not run (rate search unfinished) |" in text
    assert "shared rate" not in text


def test_reproduce_runs_the_text_table_with_the_options_given(monkeypatch):
    import reproduce

    seen = []
    monkeypatch.setattr(tq, "main", lambda argv: seen.append(argv) or "table")
    assert reproduce.main(["text-quality", "--epochs", "3", "--methods", "fps"]) == []
    assert seen == [["--epochs", "3", "--methods", "fps"]]


def test_first_run_peaks_keep_only_runs_that_started_a_fresh_process():
    done = {
        "fps|0.01|0.003|0": {"key": "fps|0.01|0.003|0", "peak_rss_mib": 1900.0, "rss_before_mib": 1000.0},
        "fps|0.01|0.01|0": {"key": "fps|0.01|0.01|0", "peak_rss_mib": 2300.0, "rss_before_mib": 1900.0},
        "full|-|1e-4|0": {"key": "full|-|1e-4|0", "peak_rss_mib": 2200.0, "rss_before_mib": 1010.0},
    }
    assert tq.first_run_peaks(done) == {
        "fps|0.01": {"peak_rss_mib": 1900.0, "rss_before_mib": 1000.0},
        "full|-": {"peak_rss_mib": 2200.0, "rss_before_mib": 1010.0},
    }


def test_rates_replace_every_methods_grid():
    args = tq.parse_args(["--rates", "0.01", "0.003", "--max-extend", "0"])
    assert set(args.lr_grid.values()) == {(0.003, 0.01)}
    assert tq.parse_args([]).lr_grid["full"] == tq.LR_GRID["full"]
    with pytest.raises(SystemExit) as stopped:
        tq.parse_args(["--rates", "0.01", "0"])
    assert stopped.value.code == 2
