"""A mask or delta tensor with no entries (issue 18): every command reads it as the parameter being absent (frozen).

A hand-made or foreign mask may hold a 0-entry index tensor for a parameter; it selects nothing, so it means what
leaving the parameter out means. `inspect`, `train`, `merge` and `eval` agree: the results are those of the same
file without the tensor, and fps itself never writes one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import CLASS_COLORS, TINY_VIT, write_images
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from typer.testing import CliRunner

from fps_cli.cli import app

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]


def fps(*args: object, cwd: Path):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300"})
    finally:
        os.chdir(old)


def _with(path: Path, out: Path, change) -> None:
    """``path`` rewritten to ``out`` with its tensors changed by ``change(tensors)``, the header kept."""
    with safe_open(path, "np") as f:
        meta = f.metadata()
    tensors = load_numpy(path)
    change(tensors)
    save_numpy(tensors, out, metadata=meta)


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A mask of test_vit, the same mask with one of its parameters turned into a 0-entry tensor (empty) or left
    out (absent), and one-epoch deltas trained on the original."""
    root = tmp_path_factory.mktemp("empty")
    for c in range(3):
        write_images(root / "data" / f"class_{c}", 3, CLASS_COLORS[c], seed=c)
    assert fps("select", *TINY_VIT, "--data", "data", "--budget", "0.05", *FAST, "-q", cwd=root).exit_code == 0
    name = sorted(load_numpy(root / "mask.safetensors"))[0]
    _with(root / "mask.safetensors", root / "empty.safetensors", lambda t: t.update({name: np.zeros(0, np.int32)}))
    _with(root / "mask.safetensors", root / "absent.safetensors", lambda t: t.pop(name))
    (root / "name").write_text(name)
    return root


@pytest.fixture
def work(made, tmp_path) -> Path:
    shutil.copytree(made, tmp_path / "w")
    return tmp_path / "w"


def test_inspect_reads_an_empty_entry_as_absent(work):
    empty = fps("inspect", "empty.safetensors", "--json", cwd=work)
    absent = fps("inspect", "absent.safetensors", "--json", cwd=work)
    assert empty.exit_code == 0 and absent.exit_code == 0, empty.output + absent.output
    a, b = json.loads(empty.stdout), json.loads(absent.stdout)
    a.pop("file"), b.pop("file")
    a.pop("path", None), b.pop("path", None)
    assert a == b


def test_train_with_an_empty_entry_is_train_without_it(work):
    name = (work / "name").read_text()
    for mask in ("empty", "absent"):
        r = fps(
            "train",
            "--mask",
            f"{mask}.safetensors",
            "-o",
            f"d_{mask}.safetensors",
            "--epochs",
            "1",
            *FAST,
            "-q",
            cwd=work,
        )
        assert r.exit_code == 0, r.output
    empty, absent = load_numpy(work / "d_empty.safetensors"), load_numpy(work / "d_absent.safetensors")
    assert f"{name}::indices" not in empty  # fps writes no 0-entry tensor
    assert empty.keys() == absent.keys()
    for key in empty:
        np.testing.assert_array_equal(empty[key], absent[key])


@pytest.fixture
def delta_with_empty(work) -> str:
    """A delta trained on the mask without the parameter, plus a 0-entry ::indices / ::values pair for it."""
    name = (work / "name").read_text()
    r = fps("train", "--mask", "absent.safetensors", "-o", "d.safetensors", "--epochs", "1", *FAST, "-q", cwd=work)
    assert r.exit_code == 0, r.output
    empty = {f"{name}::indices": np.zeros(0, np.int32), f"{name}::values": np.zeros(0, np.float32)}
    _with(work / "d.safetensors", work / "d_empty.safetensors", lambda t: t.update(empty))
    return name


def test_merge_and_eval_read_an_empty_delta_entry_as_absent(work, delta_with_empty):
    for delta in ("d", "d_empty"):
        r = fps("merge", "--delta", f"{delta}.safetensors", "-o", f"m_{delta}.safetensors", "-q", cwd=work)
        assert r.exit_code == 0, r.output
    merged, merged_empty = load_numpy(work / "m_d.safetensors"), load_numpy(work / "m_d_empty.safetensors")
    assert merged.keys() == merged_empty.keys()
    for key in merged:
        np.testing.assert_array_equal(merged[key], merged_empty[key])
    results = []
    for delta in ("d", "d_empty"):
        r = fps("eval", "--delta", f"{delta}.safetensors", "--split", "train", *FAST, "-q", "--json", cwd=work)
        assert r.exit_code == 0, r.output
        results.append({k: v for k, v in json.loads(r.stdout).items() if k not in ("delta", "seconds")})
    assert results[0] == results[1]


def test_inspect_of_a_delta_with_an_empty_entry(work, delta_with_empty):
    a = fps("inspect", "d.safetensors", "--json", cwd=work)
    b = fps("inspect", "d_empty.safetensors", "--json", cwd=work)
    assert a.exit_code == 0 and b.exit_code == 0, a.output + b.output
    ja, jb = json.loads(a.stdout), json.loads(b.stdout)
    for j in (ja, jb):
        j.pop("file", None), j.pop("path", None)
    assert ja == jb


@pytest.mark.parametrize("granularity", ["neuron", "global"])  # (layer: every layer gets its share)
def test_select_never_writes_an_empty_entry(made, tmp_path, granularity):
    """At a budget that leaves some layers without a single entry, those layers have no tensor in the mask."""
    out = tmp_path / f"{granularity}.safetensors"
    args = ["--data", "data", "--budget", "0.0115", "--granularity", granularity, "--no-scores", "-o", out]
    r = fps("select", *TINY_VIT, *args, *FAST, "-q", cwd=made)
    assert r.exit_code == 0, r.output
    tensors = load_numpy(out)
    layers = len(load_numpy(made / "mask.safetensors"))  # at budget 0.05 every candidate layer has entries
    assert 0 < len(tensors) < layers  # some candidate layers got nothing
    assert all(t.size > 0 for t in tensors.values())
