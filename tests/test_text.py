"""Text classification end to end: data formats, padding-free statistics, train / eval / merge / PEFT export on a
tiny random BERT with a tokenizer built here, and every bad input as one error line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from text_helpers import examples, text_task, tiny_bert, write_jsonl, write_text_folder
from typer.testing import CliRunner

from fps_cli.cli import app
from fps_cli.errors import DataError
from fps_cli.tasks.text_data import discover_text

runner = CliRunner()


def fps(*args: object, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    finally:
        os.chdir(old)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.fixture
def bert(tmp_path: Path) -> Path:
    return tiny_bert(tmp_path / "bert")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return text_task(tmp_path / "text")


# ------------------------------------------------------------------------------------------------ data formats


def test_jsonl_train_and_validation_files(data):
    train, val, splits = discover_text(data, {})
    assert train.classes == ["animal", "food"] and val.classes == train.classes
    assert len(train.samples) == 24 and len(val.samples) == 8
    assert splits == {
        "layout": "jsonl",
        "train_split": str(data / "train.jsonl"),
        "val_split": str(data / "validation.jsonl"),
    }
    _, label = train.samples[0]
    assert train.classes[label] == json.loads((data / "train.jsonl").read_text().splitlines()[0])["label"]


def test_one_file_with_val_split_is_seeded_and_disjoint(tmp_path):
    path = write_jsonl(tmp_path / "all.jsonl", examples(["animal", "food"], 10))
    train, val, splits = discover_text(path, {"val_split": 0.25})
    again = discover_text(path, {"val_split": 0.25})
    assert len(val.samples) == 5 and len(train.samples) == 15
    where = {e.where for e, _ in train.samples}
    assert not where & {e.where for e, _ in val.samples}  # no example in both
    assert [e.where for e, _ in again[1].samples] == [e.where for e, _ in val.samples]
    assert splits["carved"] == 0.25 and splits["train_split"] == splits["val_split"] == str(path)


def test_csv_tsv_custom_fields_and_pairs(tmp_path):
    (tmp_path / "train.csv").write_text('sentence,other,y\n"a cat, big",the dog,1\nbread,rice,0\nsoup,cake,0\n')
    train, val, _ = discover_text(tmp_path, {"text_field": "sentence", "label_field": "y", "text_pair_field": "other"})
    assert val is None
    assert train.classes == ["0", "1"]  # integer labels keep their numeric order
    assert next((e.text, e.pair, label) for e, label in train.samples) == ("a cat, big", "the dog", 1)
    tsv = tmp_path / "one.tsv"
    tsv.write_text("text\tlabel\ncat\tb\nrice\ta\n")
    assert discover_text(tsv, {})[0].classes == ["a", "b"]


def test_integer_labels_sort_numerically(tmp_path):
    rows = [{"text": "cat", "label": n} for n in (10, 2, 1, 0)]
    assert discover_text(write_jsonl(tmp_path / "x.jsonl", rows), {})[0].classes == ["0", "1", "2", "10"]


def test_class_folders_of_txt_files(tmp_path):
    write_text_folder(tmp_path / "t" / "train")
    write_text_folder(tmp_path / "t" / "val", per_class=2)
    train, val, splits = discover_text(tmp_path / "t", {})
    assert train.classes == ["animal", "food"] and len(train.samples) == 8 and len(val.samples) == 4
    assert splits["val_split"] == str(tmp_path / "t" / "val") and splits["layout"] == "text-folders"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "cat", "label": "a"}\n{"text": "dog" "label": "b"}\n', "x.jsonl:2: not valid JSON"),
        (
            '{"text": "cat", "label": "a"}\n{"txt": "dog", "label": "b"}\n',
            "x.jsonl:2: no field 'text' (fields: label, txt); name the field with --text-field",
        ),
        ('{"text": 3, "label": "a"}\n', "x.jsonl:1: field 'text' is a number, not a string"),
        (
            '{"text": "cat", "label": [1]}\n',
            "x.jsonl:1: label field 'label' is a list; a label is a string or an integer",
        ),
        ("[1, 2]\n", "x.jsonl:1: a JSON object expected, got a list"),
        ("\n\n", "x.jsonl is empty: it holds no examples"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path, content, message):
    (tmp_path / "x.jsonl").write_text(content)
    with pytest.raises(DataError, match=None) as raised:
        discover_text(tmp_path / "x.jsonl", {})
    assert message in str(raised.value)


# ------------------------------------------------------------------------- statistics over real tokens only


def test_padding_never_counts_in_the_statistics(bert, data):
    """Padded batches (batch 8) give the statistics of unpadded ones (batch 1), and the same mask; counting the
    padding too would change them (so this test can fail)."""
    from fps_cli.candidates import parameter_roles
    from fps_cli.models import ModelSpec, create_model
    from fps_cli.selector import SelectOptions, gather_input_stats, run_select
    from fps_cli.tasks import get_task

    spec = ModelSpec(f"hf:{bert}")
    options = SelectOptions(budget=0.05)
    padded = run_select(spec, data, options, batch_size=8, num_workers=0)
    single = run_select(spec, data, options, batch_size=1, num_workers=0)
    for name, s in padded.stats.items():
        assert s.count == single.stats[name].count
        assert torch.allclose(s.abs_sum, single.stats[name].abs_sum, rtol=1e-5), name  # fp32 forward
    assert padded.mask.indices.keys() == single.mask.indices.keys()
    assert all(torch.equal(padded.mask.indices[k], single.mask.indices[k]) for k in padded.mask.indices)

    task = get_task("text-classification")
    model = create_model(ModelSpec(f"hf:{bert}", num_classes=2, task=task.name))
    train = task.discover(data, {}).train
    roles = parameter_roles(model)
    loader = task.loader(model, train.samples, "select", batch_size=8)
    assert any(int((b["attention_mask"] == 0).sum()) for b in loader)  # the batches are padded
    every_token = gather_input_stats(model, roles.candidates, loader, forward=task.forward, real_tokens=lambda b: None)
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert every_token[query].count > padded.stats[query].count


# ------------------------------------------------------------------------------------- the commands, end to end


def _select_train(tmp_path, bert, data, *select_args, epochs=2, lr=1e-2):
    r = fps("select", "--model", f"hf:{bert}", "--data", data, "--budget", "0.05", *select_args, cwd=tmp_path)
    assert r.exit_code == 0, r.output
    r = fps("train", "--epochs", epochs, "--lr", lr, "--num-workers", 0, "-q", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    return r


def test_select_train_eval_merge_pipeline_and_peft(tmp_path, bert, data):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    from fps_cli.finetune import attach_delta, build_base
    from fps_cli.formats import read_delta
    from fps_cli.models import ModelSpec

    _select_train(tmp_path, bert, data)
    assert "\n  task text-classification\n" in fps("inspect", cwd=tmp_path).stdout
    evaluated = fps("eval", "--json", "-q", cwd=tmp_path)
    assert evaluated.exit_code == 0, evaluated.output
    metrics = json.loads(evaluated.stdout)
    assert metrics["samples"] == 8

    merged = fps("merge", "-o", "merged/", cwd=tmp_path)
    assert merged.exit_code == 0, merged.output
    exported = fps("export", "--to", "peft", "-o", "adapter", cwd=tmp_path)
    assert exported.exit_code == 0, exported.output

    delta = read_delta(tmp_path / "delta.safetensors")
    assert delta.provenance["task"] == "text-classification"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    batch = tokenizer(["the cat and the dog", "bread with rice and soup soup"], padding=True, return_tensors="pt")
    spec = ModelSpec(f"hf:{bert}", num_classes=2, task="text-classification")
    trained = build_base(spec, delta.shapes, delta.provenance, "delta")
    attach_delta(trained, delta)
    with torch.no_grad():
        expected = trained(**batch).logits
        reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
        assert torch.allclose(reloaded(**batch).logits, expected, atol=1e-5)
        assert reloaded.config.id2label == {0: "animal", 1: "food"}

        base = AutoModelForSequenceClassification.from_pretrained(bert, num_labels=2).eval()
        torch.manual_seed(0)  # the classifier's initialisation does not matter: the adapter saves it whole
        peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert torch.allclose(peft_model(**batch).logits, expected, atol=1e-5)

    classify = pipeline("text-classification", model=str(tmp_path / "merged"), device="cpu")
    out = classify("the cat and the dog")
    assert out[0]["label"] in ("animal", "food")
    # The pipeline gives the merged model's own answer.
    assert out[0]["label"] == ["animal", "food"][int(expected[0].argmax())]


def test_fine_tuning_learns_a_separable_task(tmp_path, bert):
    text_task(tmp_path / "data", per_class=16, val=6)
    r = fps("select", "--model", f"hf:{bert}", "--data", tmp_path / "data", "--method", "full", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    r = fps("train", "--epochs", 6, "--lr", 1e-2, "--batch-size", 8, "--json", "-q", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    metrics = json.loads(r.stdout)["metrics"]
    assert metrics["val_top1"] >= 90.0, metrics


@pytest.mark.parametrize("method", ["linear", "bias", "gps"])
def test_baselines_and_gps_work_for_text(tmp_path, bert, data, method):
    extra = ["--method", method, *(["--budget", "0.05"] if method == "gps" else [])]
    r = fps("select", "--model", f"hf:{bert}", "--data", data, *extra, "--json", "-q", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    if method == "gps":
        assert out["gps_loss"] == "supcon" and out["augment"] is False  # text: both views are the same sequence
    r = fps("train", "--epochs", 1, "--json", "-q", cwd=tmp_path)
    assert r.exit_code == 0, r.output


def test_reselect_from_text_scores_keeps_the_task(tmp_path, bert, data):
    r = fps("select", "--model", f"hf:{bert}", "--data", data, "--budget", "0.05", "--max-length", 16, cwd=tmp_path)
    assert r.exit_code == 0, r.output
    r = fps("select", "--from-scores", "scores.safetensors", "--budget", "0.1", "-o", "m2.safetensors", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    from fps_cli.formats import read_mask

    prov = read_mask(tmp_path / "m2.safetensors").provenance
    assert prov["task"] == "text-classification" and prov["data_options"] == {"max_length": 16}
    r = fps("train", "--mask", "m2.safetensors", "--epochs", 1, "-q", cwd=tmp_path)
    assert r.exit_code == 0, r.output


def test_gps_ce_for_text(tmp_path, bert, data):
    r = fps(
        "select",
        "--model",
        f"hf:{bert}",
        "--data",
        data,
        "--method",
        "gps",
        "--gps-loss",
        "ce",
        "--budget",
        "0.05",
        cwd=tmp_path,
    )
    assert r.exit_code == 0, r.output


def test_truncation_is_counted_and_reported_once(tmp_path, bert, data):
    r = fps("select", "--model", f"hf:{bert}", "--data", data, "--budget", "0.05", "--max-length", 4, cwd=tmp_path)
    assert r.exit_code == 0, r.output
    lines = [line for line in r.stderr.splitlines() if "truncated" in line]
    assert len(lines) == 1 and lines[0].endswith("texts are longer than --max-length 4 tokens and were truncated")
    r = fps("train", "--epochs", 2, "-q", cwd=tmp_path)  # the mask's --max-length is used again, reported once
    assert r.exit_code == 0, r.output
    log = [json.loads(x) for x in (tmp_path / "delta.metrics.jsonl").read_text().splitlines()]
    warnings = [e["message"] for e in log if e["event"] == "warning"]
    assert len(warnings) == 2 and warnings[0].startswith("training: ") and warnings[1].startswith("validation: ")


def test_text_pairs_through_the_cli(tmp_path, bert):
    rows = [{"a": r["text"], "b": r["text"][::-1], "y": r["label"]} for r in examples(["animal", "food"], 6)]
    write_jsonl(tmp_path / "pairs.jsonl", rows)
    args = ["--text-field", "a", "--text-pair-field", "b", "--label-field", "y", "--val-split", "0.25"]
    r = fps(
        "select", "--model", f"hf:{bert}", "--data", tmp_path / "pairs.jsonl", "--budget", "0.05", *args, cwd=tmp_path
    )
    assert r.exit_code == 0, r.output
    r = fps("train", "--epochs", 1, "--json", "-q", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["metrics"]["val_samples"] == 3


# ------------------------------------------------------------------------------------------------ bad input


BAD_LINES = [
    ('{"text": "cat", "label": "a"}\n{"text": "dog", "label": "b"\n', "train.jsonl:2: not valid JSON"),
    ('{"text": "cat", "label": "a"}\n{"label": "b"}\n', "train.jsonl:2: no field 'text' (fields: label)"),
    ('{"text": "cat", "label": "a"}\n{"text": null, "label": "b"}\n', "train.jsonl:2: field 'text' is null, not a"),
    ("", "train.jsonl is empty: it holds no examples"),
]


@pytest.mark.parametrize(("content", "message"), BAD_LINES)
def test_bad_text_data_is_one_error_line_and_writes_nothing(tmp_path, bert, content, message):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text(content)
    before = snapshot(tmp_path)
    r = fps("select", "--model", f"hf:{bert}", "--data", tmp_path / "d", "-q", cwd=tmp_path)
    line = one_error_line(r)
    assert line.startswith(f"error: {tmp_path / 'd' / 'train.jsonl'}") and message in line, line
    assert snapshot(tmp_path) == before


def test_validation_label_never_seen_in_training(tmp_path, bert, data):
    with (data / "validation.jsonl").open("a") as f:
        f.write(json.dumps({"text": "a hammer", "label": "tool"}) + "\n")
    before = snapshot(tmp_path)
    line = one_error_line(fps("select", "--model", f"hf:{bert}", "--data", data, "-q", cwd=tmp_path))
    assert line == (
        f"error: {data / 'validation.jsonl'}:9: label 'tool' never appears in the training split "
        f"{data / 'train.jsonl'} (its classes: animal, food); drop such examples, or add them to training"
    )
    assert snapshot(tmp_path) == before


def test_text_model_given_images_and_image_model_given_text(tmp_path, bert, data, image_folder):
    images = image_folder(classes=2, per_class=2)
    before = snapshot(tmp_path)
    line = one_error_line(fps("select", "--model", f"hf:{bert}", "--data", images, "-q", cwd=tmp_path))
    assert line == (
        f"error: hf:{bert} is a text-classification model, but {images} holds images; give it labelled text (JSON "
        "Lines or CSV with text and label fields, or class sub-folders of .txt files), or use an image model (a "
        "timm name) (--task forces the task of an hf: model)"
    )
    line = one_error_line(fps("select", "--model", "test_vit", "--no-pretrained", "--data", data, "-q", cwd=tmp_path))
    assert line.startswith(f"error: test_vit is an image-classification model, but {data} holds text; give it an image")
    assert snapshot(tmp_path) == before


def test_folder_model_without_tokenizer_files(tmp_path, data):
    bare = tiny_bert(tmp_path / "bare", tokenizer=False)
    before = snapshot(tmp_path)
    line = one_error_line(fps("select", "--model", f"hf:{bare}", "--data", data, "-q", cwd=tmp_path))
    assert line == (
        f"error: hf:{bare}: {bare} has no tokenizer files (tokenizer.json, tokenizer_config.json, vocab.txt...); a "
        "text model needs its tokenizer: save it there with tokenizer.save_pretrained(folder)"
    )
    assert snapshot(tmp_path) == before


def test_text_options_for_an_image_model_are_refused(tmp_path, image_folder):
    images = image_folder(classes=2, per_class=2)
    r = fps("select", "--model", "test_vit", "--no-pretrained", "--data", images, "--max-length", 8, "-q", cwd=tmp_path)
    assert one_error_line(r) == "error: --max-length: not an option of image-classification data"


def test_val_split_out_of_range_is_a_usage_error(tmp_path, bert, data):
    r = fps("select", "--model", f"hf:{bert}", "--data", data, "--val-split", 1.5, cwd=tmp_path)
    assert r.exit_code == 2
    assert "a fraction strictly between 0 and 1, got 1.5" in r.stderr


def test_wordnet_example_reads_supersenses_and_writes_few_shot_splits(tmp_path):
    """examples/wordnet_supersenses.py on a made-up data.noun in WordNet's format (licence header, field 1 the
    lexicographer file number, the gloss after |)."""
    import importlib.util

    from conftest import REPO

    spec = importlib.util.spec_from_file_location("wordnet_supersenses", REPO / "examples" / "wordnet_supersenses.py")
    wordnet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wordnet)
    lines = ["  1 This software and database is being provided to you, the LICENSEE, by"]
    for i in range(4):
        lines.append(f"0000{i}000 05 n 01 cat{i} 0 000 | a small domesticated feline number {i}  ")
        lines.append(f'0000{i}100 13 n 01 bread{i} 0 000 | food made from flour number {i}; "fresh bread"  ')
    lines.append("00009000 16 n 01 want 0 000 | the one motive here  ")
    (tmp_path / "data.noun").write_text("\n".join(lines) + "\n")
    assert wordnet.read_glosses(tmp_path / "data.noun")[0] == ("a small domesticated feline number 0", "noun.animal")
    classes = wordnet.write_supersenses(tmp_path / "wn", shots=3, val=1, source=tmp_path / "data.noun")
    assert classes == {"noun.animal": 3, "noun.food": 3}  # noun.motive has too few glosses
    train, val, _ = discover_text(tmp_path / "wn", {})
    assert train.classes == ["noun.animal", "noun.food"] and len(train.samples) == 6 and len(val.samples) == 2
    assert not {e.text for e, _ in train.samples} & {e.text for e, _ in val.samples}


def test_unknown_task_is_a_usage_error(tmp_path, bert, data):
    r = fps("select", "--model", f"hf:{bert}", "--data", data, "--task", "speech", cwd=tmp_path)
    assert r.exit_code == 2
    assert "unknown task 'speech'; expected one of image-classification, text-classification" in r.stderr


def test_readme_text_classification_commands_run(tmp_path, bert, monkeypatch):
    """The README's "Text classification" block, command by command, on the tiny BERT (for MiniLM) and a made-up
    data.noun (for Debian's): the example script, select, train, eval, merge and the pipeline line."""
    import re
    import shlex
    import subprocess
    import sys

    from conftest import REPO
    from text_helpers import WORDS

    readme = (REPO / "README.md").read_text()
    start = readme.index("## Text classification")
    block = re.findall(r"```bash\n(.*?)```", readme[start : readme.index("\n## ", start + 1)], flags=re.S)[0]
    lines = [line.split("  #")[0].strip() for line in block.splitlines()]
    codes = {"animal": "05", "food": "13"}
    noun = [f"{i:08d} {codes[label]} n 01 w 0 000 | {words[i % 8]} and {words[(i + 3) % 8]}  " for label, words in
            (("animal", WORDS["animal"]), ("food", WORDS["food"])) for i in range(48)]  # fmt: skip
    (tmp_path / "data.noun").write_text("\n".join(noun) + "\n")
    monkeypatch.chdir(tmp_path)
    ran = []
    for line in lines:
        if line.startswith("python examples/"):
            args = shlex.split(line)[1:]
            args[0] = str(REPO / args[0])
            done = subprocess.run([sys.executable, *args, "--source", "data.noun"], capture_output=True, text=True)
            assert done.returncode == 0, done.stderr
        elif line.startswith("fps "):
            args = shlex.split(line.replace("$MINILM", f"hf:{bert}").replace("--budget 0.0077", "--budget 0.05"))
            result = runner.invoke(app, [*args[1:], "-q"])
            assert result.exit_code == 0, (line, result.output)
        elif line.startswith("python -c"):
            done = subprocess.run(shlex.split(line), capture_output=True, text=True, env={**os.environ})
            assert done.returncode == 0, done.stderr
            assert "'label': 'noun." in done.stdout
        else:
            continue
        ran.append(line.split()[:2])
    assert [r[1] for r in ran if r[0] == "fps"] == ["select", "train", "eval", "merge"]
