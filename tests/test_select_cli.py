"""``fps select`` end to end through typer's CliRunner (and one real subprocess), on timm's test_vit."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DIGITS, REPO, TINY_VIT, write_images
from typer.testing import CliRunner

from fps_cli.cli import app
from fps_cli.formats import read_mask, save_mask

runner = CliRunner()


def fps(*args: str, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args])
    finally:
        os.chdir(old)


def select(tmp_path: Path, data: Path, *extra: str, budget: str = "0.05"):
    return fps(
        "select",
        *TINY_VIT,
        "--data",
        data,
        "--budget",
        budget,
        "--num-workers",
        "0",
        "--batch-size",
        "7",
        "-o",
        tmp_path / "mask.safetensors",
        "--scores",
        tmp_path / "scores.safetensors",
        *extra,
    )


def test_select_json_exact_budget_and_rows(tmp_path, image_folder):
    data = image_folder(classes=3, per_class=5)
    result = select(tmp_path, data, "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # exactly one JSON object, nothing else on stdout
    mask = read_mask(tmp_path / "mask.safetensors")
    assert payload["trainable"] == mask.trainable == round(0.05 * mask.total_params)
    assert payload["selected"] == mask.selected
    assert payload["num_classes"] == 3 and payload["num_samples"] == 15
    assert mask.shapes["head.weight"] == (3, 64)

    # Neuron level: every candidate row holds K or K+1 entries.
    rows = sum(
        mask.shapes[n][0]
        for n in mask.shapes
        if n.endswith("weight") and len(mask.shapes[n]) >= 2 and n != "head.weight"
    )
    k = mask.selected // rows
    dense = mask.dense()
    for name in mask.indices:
        per_row = dense[name].reshape(mask.shapes[name][0], -1).sum(1)
        assert bool(((per_row == k) | (per_row == k + 1)).all()), name
    prov = mask.provenance
    for key in (
        "model",
        "pretrained",
        "data",
        "num_samples",
        "method",
        "norm",
        "granularity",
        "budget",
        "seed",
        "num_classes",
        "img_size",
        "base_sha256",
        "init_seed",
    ):
        assert key in prov
    assert prov["model"] == "test_vit" and prov["img_size"] == 32 and prov["pretrained"] is False


def test_human_output_and_logs_on_stderr(tmp_path, image_folder):
    result = select(tmp_path, image_folder(per_class=2))
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("selected ")
    assert "fps select: test_vit" in result.stderr
    quiet = select(tmp_path, image_folder(per_class=2), "--force", "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_mask_round_trips_bit_for_bit(tmp_path):
    assert select(tmp_path, DIGITS).exit_code == 0
    first = read_mask(tmp_path / "mask.safetensors")
    save_mask(tmp_path / "again.safetensors", first)
    second = read_mask(tmp_path / "again.safetensors")
    assert first.indices.keys() == second.indices.keys()
    for name in first.indices:
        assert torch.equal(first.indices[name], second.indices[name])
    assert first.fully_trainable == second.fully_trainable and first.shapes == second.shapes
    assert first.provenance == second.provenance
    from safetensors.torch import load_file

    raw = load_file(tmp_path / "mask.safetensors")
    assert all(t.dtype == torch.int32 for t in raw.values())


def test_from_scores_reproduces_and_reselects(tmp_path):
    assert select(tmp_path, DIGITS, "--norm", "l2", "--granularity", "layer").exit_code == 0
    original = read_mask(tmp_path / "mask.safetensors")
    again = fps(
        "select",
        "--from-scores",
        tmp_path / "scores.safetensors",
        "--budget",
        "0.05",
        "--norm",
        "l2",
        "--granularity",
        "layer",
        "-o",
        tmp_path / "again.safetensors",
        "--json",
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["scores"] is None
    reproduced = read_mask(tmp_path / "again.safetensors")
    assert original.indices.keys() == reproduced.indices.keys()
    assert all(torch.equal(original.indices[n], reproduced.indices[n]) for n in original.indices)

    # Unspecified options take the command's defaults, not those of the first run (budget 0.0077 is too small here).
    for extra in (
        ["--budget", "0.1"],
        ["--budget", "0.05", "--granularity", "global"],
        ["--budget", "0.05", "--norm", "l1"],
        ["--topk-per-neuron", "3"],
    ):
        out = tmp_path / "other.safetensors"
        r = fps("select", "--from-scores", tmp_path / "scores.safetensors", *extra, "-o", out, "--force", "--json")
        assert r.exit_code == 0, r.output
        other = read_mask(out)
        if extra[0] == "--budget":
            assert other.trainable == round(float(extra[1]) * other.total_params)
        if extra[0] == "--topk-per-neuron":
            assert other.provenance["topk_per_neuron"] == 3
        assert other.provenance["from_scores"].endswith("scores.safetensors")


def test_methods_and_granularities_hit_the_same_count(tmp_path, image_folder):
    data = image_folder(per_class=2)
    counts = set()
    for method in ("fps", "weight", "activation", "random"):
        for granularity in ("neuron", "layer", "global"):
            r = select(tmp_path, data, "--method", method, "--granularity", granularity, "--force", "--json")
            assert r.exit_code == 0, r.output
            counts.add(json.loads(r.stdout)["trainable"])
    assert len(counts) == 1


def test_flat_unlabeled_folder_for_fps(tmp_path, image_folder):
    data = image_folder(flat=True, per_class=4)
    r = select(tmp_path, data, "--num-classes", "7", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_classes"] == 7
    assert read_mask(tmp_path / "mask.safetensors").provenance["classes"] == []


def test_max_samples_and_workers(tmp_path, image_folder):
    data = image_folder(classes=2, per_class=6)
    r = fps(
        "select",
        *TINY_VIT,
        "--data",
        data,
        "--budget",
        "0.05",
        "--max-samples",
        "5",
        "--num-workers",
        "2",
        "-o",
        tmp_path / "m.safetensors",
        "--no-scores",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["num_samples"] == 5
    assert not (tmp_path / "scores.safetensors").exists()


# ---------------------------------------------------------------------------------------------- bad input


def assert_fails(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, result.output
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.output


def assert_no_outputs(tmp_path: Path) -> None:
    assert not (tmp_path / "mask.safetensors").exists()
    assert not (tmp_path / "scores.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_missing_data_folder(tmp_path):
    assert_fails(select(tmp_path, tmp_path / "nope"), 1, "error: data folder", "does not exist")
    assert_no_outputs(tmp_path)


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_fails(select(tmp_path, tmp_path / "empty"), 1, "no images found in")
    assert_no_outputs(tmp_path)


def test_unreadable_image_and_skip_bad_images(tmp_path, image_folder):
    data = image_folder(classes=2, per_class=3)
    bad = data / "class_1" / "broken.png"
    bad.write_bytes(b"not a png at all")
    assert_fails(select(tmp_path, data), 1, f"cannot read image {bad}", "--skip-bad-images")
    assert_no_outputs(tmp_path)

    ok = select(tmp_path, data, "--skip-bad-images", "--json")
    assert ok.exit_code == 0, ok.output
    payload = json.loads(ok.stdout)
    assert payload["skipped_images"] == 1 and payload["num_samples"] == 6


def test_unknown_model(tmp_path):
    r = fps(
        "select",
        "--model",
        "test_vitt",
        "--data",
        DIGITS,
        "-o",
        tmp_path / "mask.safetensors",
        "--scores",
        tmp_path / "scores.safetensors",
    )
    assert_fails(r, 1, "unknown model 'test_vitt'", "did you mean test_vit")
    assert_no_outputs(tmp_path)


def test_unreachable_pretrained_weights_fail_fast(tmp_path):
    r = fps(
        "select",
        "--model",
        "test_vit",
        "--data",
        DIGITS,
        "-o",
        tmp_path / "mask.safetensors",
        "--scores",
        tmp_path / "scores.safetensors",
    )
    assert_fails(r, 1, "cannot download pretrained weights for test_vit", "--checkpoint", "--no-pretrained", "HF_HOME")
    assert "Retrying" not in r.output
    assert_no_outputs(tmp_path)
    offline = fps("select", "--model", "test_vit", "--data", DIGITS, "--offline", "-o", tmp_path / "mask.safetensors")
    assert_fails(offline, 1, "not in the local cache", "offline mode")


@pytest.mark.parametrize("budget", ["0", "1", "-0.1", "1.5"])
def test_budget_out_of_range_is_a_usage_error(tmp_path, budget):
    assert_fails(select(tmp_path, DIGITS, budget=budget), 2)
    assert_no_outputs(tmp_path)


def test_budget_too_small_for_fully_trainable(tmp_path):
    r = select(tmp_path, DIGITS, budget="0.001")
    assert_fails(r, 1, "budget 0.001 leaves no room", "--no-train-bias", "at least 0.0126")
    assert_no_outputs(tmp_path)
    assert select(tmp_path, DIGITS, "--no-train-bias", budget="0.01").exit_code == 0


def test_existing_output_needs_force(tmp_path):
    assert select(tmp_path, DIGITS).exit_code == 0
    before = (tmp_path / "mask.safetensors").read_bytes()
    assert_fails(select(tmp_path, DIGITS, budget="0.1"), 1, "already exists; pass --force")
    assert (tmp_path / "mask.safetensors").read_bytes() == before
    assert select(tmp_path, DIGITS, "--force", budget="0.1").exit_code == 0
    assert (tmp_path / "mask.safetensors").read_bytes() != before


def test_output_in_missing_directory(tmp_path):
    r = fps("select", *TINY_VIT, "--data", DIGITS, "-o", tmp_path / "no" / "mask.safetensors", "--no-scores")
    assert_fails(r, 1, "does not exist")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not a readable safetensors file"),  # truncated
        (b"\x00" * 64, "not a readable safetensors file"),
        ("foreign", "not an fps file"),
        ("mask", "is an fps mask file, but a scores file is needed"),
    ],
)
def test_bad_score_files(tmp_path, content, message):
    assert select(tmp_path, DIGITS).exit_code == 0
    scores = tmp_path / "scores.safetensors"
    bad = tmp_path / "bad.safetensors"
    if content is None:
        bad.write_bytes(scores.read_bytes()[: scores.stat().st_size // 2])
    elif content == "foreign":
        from safetensors.torch import save_file

        save_file({"w": torch.zeros(3)}, bad)
    elif content == "mask":
        bad.write_bytes((tmp_path / "mask.safetensors").read_bytes())
    else:
        bad.write_bytes(content)
    r = fps("select", "--from-scores", bad, "-o", tmp_path / "new.safetensors")
    assert_fails(r, 1, message)
    assert not (tmp_path / "new.safetensors").exists()


def test_from_scores_refuses_other_weights(tmp_path):
    assert select(tmp_path, DIGITS).exit_code == 0
    r = fps(
        "select",
        "--from-scores",
        tmp_path / "scores.safetensors",
        *TINY_VIT,
        "--num-classes",
        "10",
        "--budget",
        "0.05",
        "-o",
        tmp_path / "new.safetensors",
    )
    assert r.exit_code == 0, r.output  # same model, same init seed: accepted
    other = fps(
        "select",
        "--from-scores",
        tmp_path / "scores.safetensors",
        "--model",
        "test_vit2",
        "--no-pretrained",
        "--img-size",
        "32",
        "--num-classes",
        "10",
        "--budget",
        "0.05",
        "-o",
        tmp_path / "other.safetensors",
    )
    assert_fails(other, 1, "computed on other weights")
    assert not (tmp_path / "other.safetensors").exists()


def test_output_may_not_overwrite_an_input(tmp_path):
    assert select(tmp_path, DIGITS).exit_code == 0
    scores = tmp_path / "scores.safetensors"
    before = scores.read_bytes()
    args = ["select", "--from-scores", str(scores), "-o", str(scores), "--force"]
    r = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert_fails(r, 2, f"--out {scores} is also an input (--from-scores {scores})")
    assert scores.read_bytes() == before


def test_usage_errors():
    assert_fails(fps("select", "--data", str(DIGITS)), 2, "--model and --data are required")
    assert_fails(fps("select", *TINY_VIT, "--data", DIGITS, "--method", "magic"), 2)
    assert_fails(fps("select", *TINY_VIT, "--data", DIGITS, "--budget", "0.1", "--topk-per-neuron", "2"), 2)


# ------------------------------------------------------------------------------------------ real processes


def test_help_in_a_real_process_imports_no_torch():
    code = "import sys; from fps_cli.cli import main; sys.argv=['fps','--help']\ntry: main()\nexcept SystemExit: pass\n"
    code += "assert 'torch' not in sys.modules, 'fps --help imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, cwd=REPO)
    r = subprocess.run([sys.executable, "-m", "fps_cli", "--help"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0 and "select" in r.stdout


def test_select_in_a_real_process_prints_only_json(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "fps_cli",
            "select",
            *TINY_VIT,
            "--data",
            str(DIGITS),
            "--budget",
            "0.05",
            "--num-workers",
            "0",
            "--json",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert payload["mask"] == "mask.safetensors" and (tmp_path / "mask.safetensors").exists()
    assert math.isclose(payload["trainable_fraction"], 0.05, abs_tol=1e-5)
    assert "fps select" in r.stderr


def test_write_images_helper_makes_readable_pngs(tmp_path):
    write_images(tmp_path / "x", 2)
    assert len(list((tmp_path / "x").glob("*.png"))) == 2
