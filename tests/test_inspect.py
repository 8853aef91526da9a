"""``fps inspect``: masks, both kinds of score file and deltas, read from their headers; numbers that add up."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from conftest import CLASS_COLORS, TINY_VIT, write_images
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fps_cli.cli import app

runner = CliRunner()


def fps(*args: str):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """An fps mask and its input score file, a second mask, a GPS mask with its gradient score file, a delta."""
    from fps_cli.finetune import TrainConfig, run_train
    from fps_cli.formats import read_mask, save_delta

    root = tmp_path_factory.mktemp("inspect")
    for c in range(3):
        write_images(root / "data" / f"class_{c}", 4, CLASS_COLORS[c], seed=c)
    out = {name: root / f"{name}.safetensors" for name in ("mask", "scores", "mask2", "gps", "grads", "delta")}
    common = [*TINY_VIT, "--data", root / "data", "--num-workers", "0", "-q"]
    runs = [
        ("select", *common, "--budget", "0.05", "-o", out["mask"], "--scores", out["scores"]),
        ("select", "--from-scores", out["scores"], "--budget", "0.03", "--granularity", "global", "-o", out["mask2"]),
        (
            "select",
            *common,
            "--method",
            "gps",
            "--no-augment",
            "--budget",
            "0.05",
            "-o",
            out["gps"],
            "--scores",
            out["grads"],
        ),
    ]
    for args in runs:
        result = fps(*args, "-q")
        assert result.exit_code == 0, result.output
    run = run_train(read_mask(out["mask"]), TrainConfig(epochs=1, batch_size=4), device="cpu", num_workers=0)
    save_delta(out["delta"], run.delta)
    return out


def inspect_json(*args) -> dict:
    result = fps("inspect", *args, "--json")
    assert result.exit_code == 0, result.output
    assert result.stderr == ""
    return json.loads(result.stdout)  # exactly one JSON object on stdout


def test_mask_totals_equal_the_file(files, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mask.safetensors").write_bytes(files["mask"].read_bytes())
    report = inspect_json()  # the default: ./mask.safetensors
    assert report["kind"] == "mask" and report["file"] == "mask.safetensors"

    # The same numbers, straight from the file with safetensors alone.
    with safe_open(str(files["mask"]), framework="pt") as f:
        meta = f.metadata()
        selected = {k: f.get_tensor(k).numel() for k in f.keys()}  # noqa: SIM118
    shapes = json.loads(meta["fps.param_shapes"])
    fully = json.loads(meta["fps.fully_trainable"])
    total = sum(math.prod(s) for s in shapes.values())
    full = sum(math.prod(shapes[n]) for n in fully)
    t = report["totals"]
    assert t["selected"] == sum(selected.values()) == json.loads(meta["fps.selected"])
    assert t["fully_trainable"] == full
    assert t["fully_trainable_tensors"] == len(fully)
    assert t["trainable"] == sum(selected.values()) + full
    assert t["frozen"] == total - t["trainable"]
    assert t["total_params"] == total
    assert t["trainable_pct"] == pytest.approx(5.0, abs=0.01)  # --budget 0.05
    assert t["selected_layers"] == len(selected)

    # Per-layer rows: every parameter once, in model order, adding up to the totals.
    layers = report["layers"]
    assert [r["name"] for r in layers] == list(shapes)
    assert sum(r["selected"] for r in layers) == t["selected"]
    assert sum(r["trainable"] for r in layers) == t["trainable"]
    assert sum(r["numel"] - r["trainable"] for r in layers) == t["frozen"]
    assert {r["name"]: r["selected"] for r in layers if r["role"] == "selected"} == selected
    assert {r["name"] for r in layers if r["role"] == "full"} == set(fully)

    # The per-depth view and the per-neuron distribution count the same entries.
    rows = report["depth"]["rows"]
    assert [r["block"] for r in rows] == ["stem", "0", "1", "2", "3", "4", "5", "top"]
    assert sum(r["selected"] for r in rows) == t["selected"]
    assert sum(r["params"] for r in rows) == total
    assert sum(c["selected"] for r in rows for c in r["by_type"].values()) == t["selected"]
    assert rows[1]["by_type"]["qkv"]["params"] == 192 * 64 + 192  # blocks.0.attn.qkv weight and bias
    neuron = report["per_neuron"]
    assert sum(n for _, n in neuron["histogram"]) == neuron["rows"]
    assert sum(k * n for k, n in neuron["histogram"]) == t["selected"]
    assert neuron["rows"] == sum(shapes[n][0] for n in selected)


def test_mask_human_view(files):
    result = fps("inspect", files["mask"])
    assert result.exit_code == 0, result.output
    text = result.stdout
    assert text.startswith(f"{files['mask']}: mask of test_vit\n  method fps; norm l1; granularity neuron; budget 0.05")
    for part in ("totals", "per layer: 25 partially selected", "blocks.5.mlp.fc2.weight", "per depth:", "per neuron:"):
        assert part in text
    assert "█" in text  # the bars of the per-depth view


@pytest.mark.parametrize("suffix", [".png", ".svg"])
def test_plot(files, tmp_path, suffix):
    plot = tmp_path / f"mask{suffix}"
    result = fps("inspect", files["mask"], "--plot", plot, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the plot does not spill onto stdout
    data = plot.read_bytes()
    assert len(data) > 10_000
    if suffix == ".png":
        assert data.startswith(b"\x89PNG\r\n\x1a\n")
    else:
        assert data.lstrip().startswith(b"<?xml") and b"<svg" in data[:1000]
    assert [p.name for p in tmp_path.iterdir()] == [plot.name]  # no temporary left


def test_plot_errors(files, tmp_path, monkeypatch):
    result = fps("inspect", files["mask"], "--plot", tmp_path / "missing" / "mask.png")
    assert result.exit_code == 1
    assert (
        result.stderr
        == f"error: cannot write {tmp_path}/missing/mask.png: directory {tmp_path}/missing does not exist\n"
    )
    assert fps("inspect", files["mask"], "--plot", tmp_path / "mask.pdf").exit_code == 2
    three = fps("inspect", files["mask"], files["mask2"], files["mask"], "--plot", tmp_path / "m.png")
    assert three.exit_code == 2
    assert "give one or two masks, not 3 files" in three.output
    args = ["inspect", str(files["scores"]), "--plot", str(tmp_path / "m.png")]
    result = runner.invoke(app, args, env={"COLUMNS": "300"})  # the usage box would wrap the message
    assert result.exit_code == 2
    assert f"Invalid value for --plot: {files['scores']} is a scores file, not a mask" in result.output

    for name in [m for m in sys.modules if m.split(".")[0] == "matplotlib"] + ["matplotlib"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    result = fps("inspect", files["mask"], "--plot", tmp_path / "m.png")
    assert result.exit_code == 1, repr(result.exception)
    assert result.stderr == "error: --plot needs matplotlib: pip install 'fps-cli[plot]'\n"
    assert list(tmp_path.iterdir()) == []


def test_export_dense(files, tmp_path):
    from fps_cli import load_mask

    out = tmp_path / "dense.safetensors"
    result = fps("inspect", files["mask"], "--export-dense", out, "-q")
    assert result.exit_code == 0, result.output
    dense, expected = load_file(out), load_mask(files["mask"])
    assert dense.keys() == expected.keys()
    assert all(dense[k].dtype == torch.bool and dense[k].equal(expected[k]) for k in dense)
    assert sum(int(t.sum()) for t in dense.values()) == inspect_json(files["mask"])["totals"]["trainable"]

    again = fps("inspect", files["mask"], "--export-dense", out, "-q")
    assert again.exit_code == 1
    assert again.stderr == f"error: {out} already exists; pass --force to replace it\n"
    # An output that is an input is a usage error (exit 2) naming both.
    args = ["inspect", str(files["mask"]), "--export-dense", str(files["mask"]), "-q", "--force"]
    same = runner.invoke(app, args, env={"COLUMNS": "300"})
    assert same.exit_code == 2
    assert f"--export-dense {files['mask']} is also an input (FILE {files['mask']})" in same.stderr


def test_two_masks_are_compared(files):
    from fps_cli import compare_masks, read_mask

    report = inspect_json(files["mask"], files["mask2"])
    assert [f["kind"] for f in report["files"]] == ["mask", "mask"]
    expected = compare_masks(read_mask(files["mask"]), read_mask(files["mask2"])).to_dict()
    assert {k: v for k, v in report["comparison"].items() if k != "columns"} == expected  # floats round-trip exactly
    assert 0 < report["comparison"]["jaccard"] < 1
    c = report["comparison"]
    assert c["selected_a"] == report["files"][0]["totals"]["selected"]
    assert c["intersection"] == sum(layer["intersection"] for layer in c["layers"].values())

    text = fps("inspect", files["mask"], files["mask2"]).stdout
    assert f"{files['mask']} vs {files['mask2']}: {c['intersection']:,} entries shared" in text


def test_input_scores(files):
    from fps_cli import read_scores

    report = inspect_json(files["scores"])
    assert report["kind"] == "scores" and report["statistic"] == "input" and report["norm"] == "l1"
    stats, _ = read_scores(files["scores"])
    assert [r["name"] for r in report["layers"]][:2] == ["blocks.0.attn.proj.weight", "blocks.0.attn.qkv.weight"]
    assert {r["name"] for r in report["layers"]} == set(stats)
    row = next(r for r in report["layers"] if r["name"] == "blocks.0.mlp.fc2.weight")
    a = stats["blocks.0.mlp.fc2.weight"].abs_sum / stats["blocks.0.mlp.fc2.weight"].count
    assert row["count"] == a.numel() == 192
    assert row["mean"] == pytest.approx(float(a.mean()))
    assert row["min"] == pytest.approx(float(a.min())) and row["max"] == pytest.approx(float(a.max()))
    assert row["q50"] == pytest.approx(float(torch.quantile(a.double(), 0.5)))
    assert row["min"] <= row["q05"] <= row["q25"] <= row["q50"] <= row["q75"] <= row["q95"] <= row["max"]
    l2 = inspect_json(files["scores"], "--norm", "l2")
    assert l2["layers"][0]["mean"] > 0 and l2["shown"] == "a (rms x)"
    assert "scores of test_vit; per layer: a (mean |x|)" in fps("inspect", files["scores"]).stdout


def test_gradient_scores(files):
    from fps_cli import read_gradient_scores

    report = inspect_json(files["grads"])
    assert report["statistic"] == "gradient" and report["shown"] == "|grad|" and report["norm"] is None
    grads, _ = read_gradient_scores(files["grads"])
    row = next(r for r in report["layers"] if r["name"] == "blocks.2.attn.qkv.weight")
    g = grads["blocks.2.attn.qkv.weight"].abs()
    assert row["count"] == g.numel() and row["shape"] == [192, 64]
    assert row["mean"] == pytest.approx(float(g.double().mean()))
    assert row["q95"] == pytest.approx(float(torch.quantile(g.double(), 0.95)))
    assert report["totals"]["values"] == sum(t.numel() for t in grads.values())


def test_delta(files):
    from fps_cli import read_delta

    report = inspect_json(files["delta"])
    delta = read_delta(files["delta"])
    assert report["kind"] == "delta"
    assert report["train_config"]["epochs"] == 1 and report["train_config"]["optimizer"] == "adamw"
    assert set(report["metrics"]) >= {"train_loss", "train_top1"}
    assert report["provenance"]["model"] == "test_vit"
    assert report["totals"]["trained"] == delta.trained
    row = next(r for r in report["layers"] if r["name"] == "blocks.3.mlp.fc1.weight")
    assert row["kind"] == "partial" and row["entries"] == delta.values["blocks.3.mlp.fc1.weight"].numel()
    assert row["change_l2"] == pytest.approx(float(delta.values["blocks.3.mlp.fc1.weight"].double().norm()))
    assert sum(r["entries"] for r in report["layers"]) == delta.trained
    text = fps("inspect", files["delta"]).stdout
    assert "training\n  epochs 1; lr 0.001" in text and "final metrics\n  epoch 1;" in text


def test_mixed_files_in_one_call(files):
    report = inspect_json(files["mask"], files["grads"], files["delta"])
    assert [f["kind"] for f in report["files"]] == ["mask", "scores", "delta"]
    assert report["comparison"] is None


# --------------------------------------------------------------------------------------------- bad input


def test_bad_files(files, tmp_path):
    data = files["mask"].read_bytes()
    (tmp_path / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    save_file({"x": torch.zeros(2)}, tmp_path / "foreign.safetensors")
    (tmp_path / "notes.txt").write_text("hello")
    cases = {
        "truncated.safetensors": "is not a readable safetensors file (truncated or corrupt?): ",
        "foreign.safetensors": "is a safetensors file but not an fps file (no fps.format in its header)",
        "notes.txt": "is not a readable safetensors file (truncated or corrupt?): ",
        "missing.safetensors": "does not exist",
    }
    for name, text in cases.items():
        result = fps("inspect", files["mask"], tmp_path / name)
        assert result.exit_code == 1, name
        assert result.stderr.startswith(f"error: {tmp_path / name} {text}"), result.stderr
        assert len(result.stderr.splitlines()) == 1
        assert result.stdout == ""  # nothing printed for the good file either


def test_masks_of_different_models(files, tmp_path):
    other, data = tmp_path / "other.safetensors", files["mask"].parent / "data"
    result = fps(
        "select",
        *TINY_VIT[:-1],
        "48",
        "--data",
        data,
        "--budget",
        "0.05",
        "--no-scores",
        "-o",
        other,
        "--num-workers",
        "0",
    )
    assert result.exit_code == 0, result.output
    result = fps("inspect", files["mask"], other)
    assert result.exit_code == 1
    assert result.stderr == (
        "error: the masks are of different models:\n  pos_embed: [1, 5, 64] in a vs [1, 10, 64] in b\n"
    )


@pytest.mark.parametrize(
    ("name", "shape", "block", "kind"),
    [
        ("blocks.3.attn.qkv.weight", (192, 64), "blocks.3", "qkv"),
        ("blocks.3.attn.proj.bias", (64,), "blocks.3", "proj"),
        ("blocks.11.mlp.fc1.weight", (3072, 768), "blocks.11", "fc1"),
        ("layers.1.blocks.0.mlp.fc2.weight", (96, 384), "layers.1.blocks.0", "fc2"),  # Swin
        ("layers.1.downsample.reduction.weight", (192, 384), "layers.1", "other"),
        ("layer2.1.conv1.weight", (128, 128, 3, 3), "layer2.1", "conv"),  # ResNet
        ("layer2.0.downsample.0.weight", (128, 64, 1, 1), "layer2.0", "conv"),
        ("stages.2.blocks.4.conv_dw.weight", (384, 1, 7, 7), "stages.2.blocks.4", "conv"),  # ConvNeXt
        ("encoder.layer.5.attention.attention.query.weight", (768, 768), "encoder.layer.5", "qkv"),  # HF ViT
        ("encoder.layer.5.attention.output.dense.weight", (768, 768), "encoder.layer.5", "proj"),
        ("encoder.layer.5.intermediate.dense.weight", (3072, 768), "encoder.layer.5", "fc1"),
        ("encoder.layer.5.output.dense.weight", (768, 3072), "encoder.layer.5", "fc2"),
        ("pos_embed", (1, 197, 768), None, "other"),  # 3-D, but not a conv weight
        ("patch_embed.proj.weight", (768, 3, 16, 16), None, "conv"),
        ("head.weight", (10, 768), None, "other"),
    ],
)
def test_block_and_layer_type_from_names(name, shape, block, kind):
    from fps_cli.inspection import block_of, layer_type

    assert block_of(name) == block
    assert layer_type(name, shape) == kind


def test_biases_take_their_layers_type():
    from fps_cli.inspection import depth_keys, layer_types

    shapes = {"cls_token": (1, 1, 8), "stem.proj.weight": (8, 3, 4, 4), "stem.proj.bias": (8,)}
    shapes |= {"blocks.0.mlp.fc1.weight": (16, 8), "blocks.0.mlp.fc1.bias": (16,), "norm.weight": (8,)}
    assert layer_types(shapes) == {
        "cls_token": "other",
        "stem.proj.weight": "conv",
        "stem.proj.bias": "conv",
        "blocks.0.mlp.fc1.weight": "fc1",
        "blocks.0.mlp.fc1.bias": "fc1",
        "norm.weight": "other",
    }
    assert list(depth_keys(shapes).values()) == ["stem", "stem", "stem", "0", "0", "top"]


def test_column_concentration_by_hand():
    """A 4 x 6 weight: 5 entries in column 2, 1 in column 5; the top 10% of 6 columns is 1 column."""
    from fps_cli.formats import Mask
    from fps_cli.inspection import column_view

    idx = torch.tensor([2, 8, 14, 20, 22, 23])  # rows 0..3 column 2; row 3 columns 4 and 5
    mask = Mask({"fc.weight": idx}, [], {"fc.weight": (4, 6), "fc.bias": (4,)})
    view = column_view(mask)
    (row,) = view["layers"]
    assert row == {
        "name": "fc.weight",
        "selected": 6,
        "inputs": 6,
        "distinct": 3,
        "distinct_pct": 50.0,
        "top_share": 4 / 6,
        "top": [[2, 4], [4, 1], [5, 1]],
    }
    assert view["summary"]["top_fraction"] == 0.1


def test_column_view_counts_the_files_indices(files):
    report = inspect_json(files["mask"])
    with safe_open(str(files["mask"]), framework="pt") as f:
        shapes = json.loads(f.metadata()["fps.param_shapes"])
        indices = {k: f.get_tensor(k).long() for k in f.keys()}  # noqa: SIM118
    rows = report["columns"]["layers"]
    assert [r["name"] for r in rows] == [n for n in shapes if n in indices and len(shapes[n]) > 1]
    for r in rows:
        row_len = math.prod(shapes[r["name"]][1:])
        used = set((indices[r["name"]] % row_len).tolist())
        assert r["inputs"] == row_len and r["distinct"] == len(used)
        assert r["selected"] == indices[r["name"]].numel()
        assert 0.1 <= r["top_share"] <= 1.0  # at least an even spread's share, at most everything
        assert all(c in used for c, _ in r["top"])
    text = fps("inspect", files["mask"]).stdout
    assert "input columns: which inputs of each layer the selection uses; mean over 25 layers: " in text


def test_two_masks_column_differences(files, tmp_path):
    both = inspect_json(files["mask"], files["mask2"])
    a, b = (f["columns"]["layers"] for f in both["files"])
    columns = both["comparison"]["columns"]["layers"]
    for row in a:
        c = columns[row["name"]]
        assert c["columns_a"] == row["distinct"]
        assert c["columns_both"] <= min(c["columns_a"], c["columns_b"])
        union = c["columns_a"] + c["columns_b"] - c["columns_both"]
        assert c["columns_jaccard"] == pytest.approx(c["columns_both"] / union)
    assert {r["name"]: r["distinct"] for r in b} == {n: c["columns_b"] for n, c in columns.items() if c["columns_b"]}
    text = fps("inspect", files["mask"], files["mask2"]).stdout
    assert "input columns each mask uses, per layer; mean column jaccard" in text

    plot = tmp_path / "diff.png"
    result = fps("inspect", files["mask"], files["mask2"], "--plot", plot, "-q")
    assert result.exit_code == 0, result.output
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result.stdout == "" and result.stderr == ""  # -q with --plot prints nothing
