"""What fps says when the system gets in the way (issue 18, item 7): each case runs the real command and pins its
words and exit code.

- a full disk during a folder output names the folder the user gave, not fps's hidden staging folder;
- an `hf:` weights file this process cannot read is "Permission denied", not "No such file or directory";
- SIGTERM (docker stop, kill) says "interrupted" as Ctrl-C does, and leaves nothing behind;
- a dangling-symlink image is reported (or skipped and counted), never silently left out;
- an output folder that cannot be written stops `train` before any work;
- `inspect --plot` into the mask's data folder warns that it would become a training image.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import CLASS_COLORS, REPO, TINY_VIT, tiny_hf_vit, wait_stopped, write_images
from typer.testing import CliRunner

from fps_cli.cli import app

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]


def fps(*args: object, cwd: Path):
    old = Path.cwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300", "HF_HUB_OFFLINE": "1"})
    finally:
        os.chdir(old)


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "COLUMNS": "300", **extra}
    for key in ("FPS_TEST_CRASH_AT", "FPS_TEST_STOP_AT"):
        if key not in extra:
            env.pop(key, None)
    return env


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A data folder, a mask of test_vit on it and a one-epoch delta, in run/."""
    root = tmp_path_factory.mktemp("messages")
    for c in range(3):
        write_images(root / "data" / f"class_{c}", 3, CLASS_COLORS[c], seed=c)
    run = root / "run"
    run.mkdir()
    assert fps("select", *TINY_VIT, "--data", root / "data", "--budget", "0.05", *FAST, "-q", cwd=run).exit_code == 0
    assert fps("train", "--epochs", "1", *FAST, "-q", cwd=run).exit_code == 0
    return root


@pytest.fixture
def run(built, tmp_path) -> Path:
    shutil.copytree(built, tmp_path / "b", symlinks=True)
    return tmp_path / "b" / "run"


def test_full_disk_during_a_folder_output_names_the_folder_given(run, tmpfs):
    disk = tmpfs("small", "size=64k")
    r = fps("merge", "-o", f"{disk}/merged/", "-q", cwd=run)
    assert r.exit_code == 1
    assert r.stderr == f"error: cannot write {disk}/merged/model.safetensors: No space left on device\n"
    assert snapshot(disk) == {}


def test_a_read_only_output_folder_stops_train_before_any_work(run, tmpfs, monkeypatch):
    from fps_cli import finetune

    def no_training(*a, **k):
        raise AssertionError("training started before the output folder was checked")

    monkeypatch.setattr(finetune, "run_train", no_training)
    ro = tmpfs("ro", "ro,size=64k")
    r = fps("train", "-o", ro / "delta.safetensors", *FAST, cwd=run)
    assert r.exit_code == 1
    assert r.stderr == f"error: cannot write {ro / 'delta.safetensors'}: Read-only file system\n"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see a stopped process")
def test_sigterm_says_interrupted_and_leaves_nothing(run, built):
    before = snapshot(run)
    args = [
        "select",
        *TINY_VIT,
        "--data",
        built / "data",
        "--budget",
        "0.1",
        *FAST,
        "-o",
        "m.safetensors",
        "--no-scores",
    ]
    cmd = [sys.executable, "-m", "fps_cli", *(str(a) for a in args)]
    proc = subprocess.Popen(
        cmd, cwd=run, env=_env(FPS_TEST_STOP_AT="written"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_stopped(proc.pid)  # its files are written, not yet renamed
        os.kill(proc.pid, signal.SIGTERM)
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.splitlines()[-1] == "interrupted" and "Traceback" not in err
    assert out == ""
    assert snapshot(run) == before  # no temporary, no lock file, no new output


def test_a_dangling_symlink_image_is_reported_or_skipped_and_counted(built, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(built / "data", data, symlinks=True)
    (data / "class_0" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    args = ["select", *TINY_VIT, "--data", data, "--budget", "0.05", *FAST, "--no-scores", "-o", "m.safetensors"]
    r = fps(*args, "-q", cwd=tmp_path)
    assert r.exit_code == 1
    assert r.stderr.startswith(f"error: cannot read image {data / 'class_0' / 'gone.png'}: ")
    assert r.stderr.rstrip().endswith("(pass --skip-bad-images to skip such files)")
    r = fps(*args, "--skip-bad-images", "--json", cwd=tmp_path)
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["skipped_images"] == 1


def _can_drop_root() -> str | None:
    if os.geteuid() != 0:
        return "needs root to make a file another user's (chown)"
    probe = subprocess.run(["unshare", "--user", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --user is not allowed here: {probe.stderr.strip()}"
    return None


@pytest.mark.skipif(_can_drop_root() is not None, reason=str(_can_drop_root()))
def test_an_unreadable_hf_weights_file_is_permission_denied(built, tmp_path):
    """The weights belong to another user, mode 0600 (as transformers writes them); fps runs in a user namespace,
    where root's override of file permissions does not reach them."""
    pytest.importorskip("transformers")
    tiny_hf_vit(tmp_path / "tinyvit", layers=1)
    weights = tmp_path / "tinyvit" / "model.safetensors"
    os.chown(weights, 12345, 12345)
    weights.chmod(0o600)
    args = ["--model", "hf:tinyvit", "--data", built / "data", "--budget", "0.2", *FAST, "--no-scores", "-q"]
    cmd = ["unshare", "--user", sys.executable, "-m", "fps_cli", "select", *(str(a) for a in args)]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert r.stderr.splitlines()[-1] == (
        "error: hf:tinyvit: cannot read tinyvit/model.safetensors: Permission denied (make it readable, e.g. chmod "
        "a+r tinyvit/model.safetensors, or run fps as its owner)"
    )


def test_a_plot_inside_the_masks_data_folder_warns(run, built):
    data = built / "data"
    target = data / "class_0" / "plot.png"
    try:
        r = fps("inspect", "mask.safetensors", "--plot", target, cwd=run)
        assert r.exit_code == 0, r.output
        assert (
            f"warning: --plot {target} is inside {data.resolve()}, the mask's data folder: select and train would "
            "read it as an image; write it elsewhere"
        ) in r.stderr.splitlines()
    finally:
        target.unlink(missing_ok=True)
    elsewhere = fps("inspect", "mask.safetensors", "--plot", run / "plot.png", cwd=run)
    assert elsewhere.exit_code == 0 and "warning" not in elsewhere.stderr
