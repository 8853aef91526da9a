"""The task seam (fps_cli.tasks): which task a model gets, what data kind a path holds, the registry's values,
and that the core stays free of task code."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import REPO
from test_distributed import run_fps
from text_helpers import text_task, tiny_bert

from fps_cli.errors import DataError, ModelError
from fps_cli.formats import read_mask
from fps_cli.models import ModelSpec
from fps_cli.tasks import (
    IMAGE_CLASSIFICATION,
    TEXT_CLASSIFICATION,
    Task,
    check_data,
    data_kind,
    get_task,
    resolve_task,
    task_from_config,
    task_names,
)


def test_registry_holds_frozen_task_values():
    assert {IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION} <= set(task_names())
    for name in task_names():
        task = get_task(name)
        assert isinstance(task, Task) and task.name == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            task.name = "other"  # type: ignore[misc]
    with pytest.raises(ModelError, match="unknown task 'speech'; expected one of image-classification"):
        get_task("speech")


@pytest.mark.parametrize(
    ("config", "task"),
    [
        ({"architectures": ["ViTForImageClassification"], "model_type": "vit"}, IMAGE_CLASSIFICATION),
        ({"architectures": ["RobertaForSequenceClassification"], "model_type": "roberta"}, TEXT_CLASSIFICATION),
        ({"architectures": ["BertModel"], "model_type": "bert"}, TEXT_CLASSIFICATION),  # a bare encoder
        ({"architectures": ["ViTModel"], "model_type": "vit"}, IMAGE_CLASSIFICATION),
        ({"model_type": "deberta-v2"}, TEXT_CLASSIFICATION),
        ({"model_type": "no-such-model"}, None),
    ],
)
def test_task_from_config(config, task):
    assert task_from_config(config) == task


def test_resolve_task_from_the_model_and_forced(tmp_path):
    bert = tiny_bert(tmp_path / "bert")
    assert resolve_task(ModelSpec("test_vit")).name == IMAGE_CLASSIFICATION
    assert resolve_task(ModelSpec(f"hf:{bert}")).name == TEXT_CLASSIFICATION
    tagged = tiny_bert(tmp_path / "tagged", architectures=["BertForSequenceClassification"])
    assert resolve_task(ModelSpec(f"hf:{tagged}")).name == TEXT_CLASSIFICATION
    assert resolve_task(ModelSpec(f"hf:{bert}", task=IMAGE_CLASSIFICATION)).name == IMAGE_CLASSIFICATION
    with pytest.raises(ModelError, match="--task text-classification needs an hf: model; test_vit is a timm"):
        resolve_task(ModelSpec("test_vit", task=TEXT_CLASSIFICATION))


def test_data_kind(tmp_path, image_folder):
    images = image_folder(classes=2, per_class=2)
    text = text_task(tmp_path / "text")
    assert data_kind(images) == "images"
    assert data_kind(text) == "text" and data_kind(text / "train.jsonl") == "text"
    (tmp_path / "empty").mkdir()
    assert data_kind(tmp_path / "empty") is None and data_kind(tmp_path / "missing") is None
    check_data(get_task(IMAGE_CLASSIFICATION), ModelSpec("test_vit"), images)  # fits: no error
    with pytest.raises(DataError, match="holds text"):
        check_data(get_task(IMAGE_CLASSIFICATION), ModelSpec("test_vit"), text)


def test_files_record_the_task(tmp_path, image_folder):
    from typer.testing import CliRunner

    from fps_cli.cli import app

    data = image_folder(classes=2, per_class=3)
    r = CliRunner().invoke(
        app,
        ["select", "--model", "test_vit", "--no-pretrained", "--img-size", "32", "--data", str(data), "--budget",
         "0.05", "-o", str(tmp_path / "m.safetensors"), "--no-scores", "-q"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    prov = read_mask(tmp_path / "m.safetensors").provenance
    assert prov["task"] == IMAGE_CLASSIFICATION
    assert "data_options" not in prov  # an image mask keeps its earlier header otherwise


CORE = ("activations", "scoring", "selection", "sparse", "formats", "outputs", "candidates", "headers")


@pytest.mark.parametrize("module", CORE)
def test_the_core_knows_no_task(module):
    source = (REPO / "fps_cli" / f"{module}.py").read_text()
    assert not re.search(r"from \.tasks|import tasks|fps_cli\.tasks", source)
    assert "input_ids" not in source and "pixel_values" not in source


# ~20 s each (two torchrun processes); the image torchrun tests cover the seam's rank logic by default
@pytest.mark.slow
def test_two_processes_give_the_single_process_text_mask(tmp_path):
    """torchrun goes through the seam: 2 gloo ranks give the one-process mask on text (padded batches)."""
    bert = tiny_bert(tmp_path / "bert")
    data = text_task(tmp_path / "text", per_class=7)  # 14 texts in batches of 4: the last shard is partial
    common = ["select", "--model", f"hf:{bert}", "--data", str(data), "--budget", "0.05", "--batch-size", "4"]
    common += ["--device", "cpu"]
    one = run_fps([*common, "-o", "m1.safetensors", "--scores", "s1.safetensors", "-q"], tmp_path)
    assert one.returncode == 0, one.stderr
    two = run_fps([*common, "-o", "m2.safetensors", "--scores", "s2.safetensors", "--json"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["num_samples"] == 14
    a, b = read_mask(tmp_path / "m1.safetensors"), read_mask(tmp_path / "m2.safetensors")
    assert a.indices.keys() == b.indices.keys()
    assert all(torch.equal(a.indices[n], b.indices[n]) for n in a.indices)
    assert a.provenance["task"] == b.provenance["task"] == TEXT_CLASSIFICATION
    assert Path(tmp_path / "m2.safetensors").is_file()


# ~20 s each (two torchrun processes); the image torchrun tests cover the seam's rank logic by default
@pytest.mark.slow
def test_two_process_text_training_gathers_validation_over_ranks(tmp_path):
    """torchrun training on text: each rank pads its own batches; validation is summed over both ranks. (Not compared
    with one process bit for bit: BERT's dropout draws differ per rank.)"""
    from fps_cli.formats import read_delta

    bert = tiny_bert(tmp_path / "bert")
    data = text_task(tmp_path / "text", per_class=6, val=3)
    select = run_fps(["select", "--model", f"hf:{bert}", "--data", str(data), "--budget", "0.05", "-q"], tmp_path)
    assert select.returncode == 0, select.stderr
    two = run_fps(["train", "--epochs", "1", "--batch-size", "2", "--device", "cpu", "--json"], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr
    assert json.loads(two.stdout)["metrics"]["val_samples"] == 6
    delta = read_delta(tmp_path / "delta.safetensors")
    assert delta.provenance["task"] == TEXT_CLASSIFICATION and delta.provenance["val_samples"] == 6
