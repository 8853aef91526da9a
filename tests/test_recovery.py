"""Recovery of a killed group commit where fps usually runs (issue 18): under another hostname, in a new pid
namespace, in a copied folder, and when the next command reads the folder as a model (``hf:``, ``local-dir:``,
``--checkpoint``) rather than as an fps file.

Every case kills the real ``fps`` command between its renames (``FPS_TEST_CRASH_AT``) and runs the next real command,
then pins the exact bytes of every file in the folder: all old, no leftovers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import CLASS_COLORS, REPO, TINY_VIT, tiny_hf_vit, wait_stopped, write_images
from typer.testing import CliRunner

from fps_cli import outputs
from fps_cli.cli import app

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]
SELECT = ["select", *TINY_VIT, "--budget", "0.05", *FAST, "-q"]


def fps(*args: object, cwd: Path | None = None):
    old = Path.cwd()
    if cwd is not None:
        os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], env={"COLUMNS": "300", "HF_HUB_OFFLINE": "1"})
    finally:
        os.chdir(old)


def _env(hostname: str | None = None, **extra: str) -> dict[str, str]:
    path = str(REPO)
    if hostname is not None:  # the process sees another hostname, as every fresh `docker run` does
        site = Path(os.environ.get("TMPDIR", "/tmp")) / f"fps-host-{hostname}"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(f"import socket\nsocket.gethostname = lambda: {hostname!r}\n")
        path = f"{site}{os.pathsep}{path}"
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", **extra}
    for key in (outputs.CRASH_ENV, outputs.STOP_ENV):
        if key not in extra:
            env.pop(key, None)
    return env


def fps_process(*args: object, cwd: Path, hostname: str | None = None, prefix: tuple[str, ...] = (), **env: str):
    cmd = [*prefix, sys.executable, "-m", "fps_cli", *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(hostname, **env), capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> set[str]:
    return {name for name in snapshot(folder) if Path(name).name.startswith(".")}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A data folder and a mask + scores of test_vit on it (the group a killed `select --force` leaves half-new)."""
    root = tmp_path_factory.mktemp("recovery")
    data = root / "data"
    for c in range(3):
        write_images(data / f"class_{c}", 4, CLASS_COLORS[c], seed=c)
    (root / "run").mkdir()
    assert fps(*SELECT, "--data", data, cwd=root / "run").exit_code == 0
    return root


@pytest.fixture
def run(built, tmp_path) -> Path:
    shutil.copytree(built / "run", tmp_path / "run", symlinks=True)
    return tmp_path / "run"


def _kill_select(run: Path, built: Path, **how) -> dict[str, bytes]:
    """`fps select --force` on fewer images, killed after its first rename: one file new, the other old. Returns the
    state before."""
    before = snapshot(run)
    args = [
        "select",
        *TINY_VIT,
        "--data",
        built / "data",
        "--budget",
        "0.05",
        "--max-samples",
        "6",
        *FAST,
        "-q",
        "--force",
    ]
    killed = fps_process(*args, cwd=run, FPS_TEST_CRASH_AT="rename:1", **how)
    assert killed.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL), killed.stderr
    assert any(n.startswith(".fps-journal-") for n in leftovers(run))
    half = {k: v for k, v in snapshot(run).items() if not k.startswith(".")}
    assert set(half) == set(before) and half != before  # one file new, the other old
    return before


# ------------------------------------------------------------------------- 1. another hostname, 2. pid namespace


def test_another_hostname_rolls_back(run, built):
    before = _kill_select(run, built, hostname="container-a")
    read = fps_process("inspect", "mask.safetensors", "--json", cwd=run, hostname="container-b")
    assert read.returncode == 0, read.stderr
    assert snapshot(run) == before  # all old, no journal, temporary or backup left
    # --from-scores reads the old scores beside the old mask.
    again = fps_process(
        "select",
        "--from-scores",
        "scores.safetensors",
        "--budget",
        "0.05",
        "-o",
        "m.safetensors",
        cwd=run,
        hostname="container-c",
    )
    assert again.returncode == 0, again.stderr


def _can_unshare_uts() -> str | None:
    if os.geteuid() != 0:
        return "setting another hostname (unshare --uts) needs root"
    probe = subprocess.run(["unshare", "--uts", "hostname", "probe"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare --uts is not allowed here: {probe.stderr.strip()}"


def _uts(name: str) -> tuple[str, ...]:
    """Run the command in its own UTS namespace with the hostname ``name``, as `docker run` gives each container."""
    return ("unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', name)


@pytest.mark.skipif(_can_unshare_uts() is not None, reason=str(_can_unshare_uts()))
def test_another_real_hostname_rolls_back(run, built):
    before = _kill_select(run, built, prefix=_uts("container-a"))
    read = fps_process("inspect", "mask.safetensors", "--json", cwd=run, prefix=_uts("container-b"))
    assert read.returncode == 0, read.stderr
    assert snapshot(run) == before


def _can_unshare() -> str | None:
    if os.geteuid() != 0:
        return "a new pid namespace (unshare --pid) needs root"
    if shutil.which("unshare") is None:
        return "util-linux unshare is not installed"
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"unshare --pid is not allowed here: {probe.stderr.strip()}"
    return None


# `sh -c 'CMD; exit $?'`: sh is pid 1 of the namespace and fps is pid 2 (the pid a container restarted after an OOM
# kill gives it again); pid 1 itself would ignore the crash hook's SIGKILL.
NAMESPACE = ("unshare", "--pid", "--fork", "--mount-proc", "sh", "-c", '"$@"; exit $?', "sh")


@pytest.mark.skipif(_can_unshare() is not None, reason=str(_can_unshare()))
def test_same_pid_in_a_new_pid_namespace_rolls_back(run, built):
    before = _kill_select(run, built, prefix=NAMESPACE)
    journal = next(n for n in leftovers(run) if n.startswith(".fps-journal-"))
    assert journal.startswith(".fps-journal-2-")  # the writer was pid 2
    read = fps_process("inspect", "mask.safetensors", "--json", cwd=run, prefix=NAMESPACE)  # pid 2 again
    assert read.returncode == 0, read.stderr
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------------- 3. a copied folder


@pytest.mark.skipif(shutil.which("cp") is None, reason="needs cp")
def test_a_copied_folder_recovers_itself_only(run, built, tmp_path):
    before = _kill_select(run, built)
    killed_state = snapshot(run)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    read = fps("inspect", copy / "mask.safetensors", "--json", cwd=tmp_path)
    assert read.exit_code == 0, read.output
    assert snapshot(copy) == before  # the copy is all old, its own backups restored
    assert snapshot(run) == killed_state  # the original was not touched by a read of the copy
    assert fps("inspect", run / "mask.safetensors", "--json", cwd=tmp_path).exit_code == 0
    assert snapshot(run) == before


# --------------------------------------------------------------------------------------- 4. reading a model folder


@pytest.fixture(scope="module")
def hf_built(tmp_path_factory) -> Path:
    """An hf: tiny ViT, a delta trained on it, and the merged folder T/ (the model a later command reads)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hfrec")
    tiny_hf_vit(root / "tinyvit", layers=1)
    data = root / "data"
    for c in range(3):
        write_images(data / f"class_{c}", 3, CLASS_COLORS[c], seed=c)
    base = ["--model", "hf:tinyvit", "--data", "data", *FAST, "-q"]
    assert fps("select", *base, "--budget", "0.2", cwd=root).exit_code == 0
    trained = fps("train", "--epochs", "1", *FAST, "-q", cwd=root)
    assert trained.exit_code == 0, trained.output
    merged = fps("merge", "-o", "T/", "-q", cwd=root)
    assert merged.exit_code == 0, merged.output
    return root


def _kill_folder_merge(root: Path) -> dict[str, bytes]:
    """`fps merge -o T/ --force --dtype bf16` killed after renaming config.json (the same) and model.safetensors
    (now bf16), before preprocessor_config.json: the folder is half-new."""
    before = snapshot(root / "T")
    killed = fps_process(
        "merge", "-o", "T/", "--force", "--dtype", "bf16", "-q", cwd=root, FPS_TEST_CRASH_AT="rename:2"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    after = {k: v for k, v in snapshot(root / "T").items() if not k.startswith(".")}
    assert set(after) == set(before) and after != before  # one file new, the others old
    return before


@pytest.mark.parametrize("command", ["select", "merge"])
def test_reading_an_hf_folder_rolls_back_its_killed_group(hf_built, tmp_path, command):
    root = tmp_path / "hf"
    shutil.copytree(hf_built, root, symlinks=True)
    before = _kill_folder_merge(root)
    if command == "select":
        r = fps(
            "select",
            "--model",
            "hf:T",
            "--data",
            "data",
            "--budget",
            "0.2",
            "-o",
            "m.safetensors",
            "--no-scores",
            *FAST,
            "-q",
            cwd=root,
        )
    else:
        r = fps("merge", "--model", "hf:T", "-o", "m2.safetensors", "-q", cwd=root)
    assert snapshot(root / "T") == before  # rolled back before it was read
    assert r.exit_code in (0, 1), r.output  # (merge may refuse T as another base: what matters is what it read)


@pytest.fixture(scope="module")
def timm_built(built) -> Path:
    """A timm local-dir: folder export/ merged from a one-epoch delta of test_vit."""
    root = built
    trained = fps("train", "--epochs", "1", *FAST, "-q", cwd=root / "run")
    assert trained.exit_code == 0, trained.output
    assert fps("merge", "-o", "export/", "-q", cwd=root / "run").exit_code == 0
    return root


@pytest.mark.parametrize("how", ["local-dir", "checkpoint"])
def test_reading_a_local_dir_or_checkpoint_rolls_back_its_killed_group(timm_built, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(timm_built / "run", run, symlinks=True)
    before = snapshot(run / "export")
    killed = fps_process(
        "merge", "-o", "export/", "--force", "--dtype", "bf16", "-q", cwd=run, FPS_TEST_CRASH_AT="rename:2"
    )  # both renamed, the journal still there
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert snapshot(run / "export") != before
    model = (
        ["--model", "local-dir:export"]
        if how == "local-dir"
        else [*TINY_VIT, "--checkpoint", "export/model.safetensors"]
    )
    args = ["--data", timm_built / "data", "--budget", "0.05", "-o", "m.safetensors", "--no-scores", *FAST, "-q"]
    r = fps("select", *model, *args, cwd=run)
    assert snapshot(run / "export") == before
    assert r.exit_code in (0, 1), r.output


# ----------------------------------------------------------------------- a live writer is never judged dead


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see a stopped process")
def test_a_reader_waits_for_a_live_writer_then_refuses_and_the_writer_finishes(run, built, monkeypatch):
    """The writer stops with its journal in place (SIGSTOP keeps its lock); a reader elsewhere (another hostname
    would not matter) refuses to read the half-renamed folder, naming the journal; the writer then commits."""
    args = ["select", *TINY_VIT, "--data", built / "data", "--budget", "0.05", "--max-samples", "6", *FAST, "-q"]
    cmd = [sys.executable, "-m", "fps_cli", *(str(a) for a in args), "--force"]
    writer = subprocess.Popen(cmd, cwd=run, env=_env(FPS_TEST_STOP_AT="rename:1"), stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(writer.pid)
        held = snapshot(run)
        journal = next(n for n in held if n.startswith(".fps-journal-"))
        monkeypatch.setattr(outputs, "LIVE_WAIT_S", 0.2)
        r = fps("inspect", "mask.safetensors", cwd=run)
        assert r.exit_code == 1
        assert r.stderr == (
            f"error: {journal} is an unfinished group write by an fps command that is still running (it holds its "
            "lock); run this command again when it has finished\n"
        )
        # A writer to the same folder leaves the live group alone too (its checks settle only dead writers).
        assert fps(
            "select",
            "--from-scores",
            "scores.safetensors",
            "--budget",
            "0.05",
            "-o",
            "m.safetensors",
            "--no-scores",
            cwd=run,
        ).exit_code in (0, 1)
        assert {k: v for k, v in snapshot(run).items() if k != "m.safetensors"} == held
        os.kill(writer.pid, signal.SIGCONT)
        _, stderr = writer.communicate(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
    assert writer.returncode == 0, stderr
    assert not leftovers(run)  # committed: no journal, backup, temporary or lock file


# ------------------------------------------------------------------ leftovers of an earlier fps (host and pid)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _old_format_crash(run: Path, host: str, pid: int) -> None:
    """What an earlier fps left when killed after its first rename: mask.safetensors new, its backup and an
    absolute-path journal named by pid and host."""
    final = run / "mask.safetensors"
    temp = run / f".mask.safetensors.fps-tmp-{pid}-{host}00000001"
    backup = run / f".mask.safetensors.fps-old-{pid}-{host}00000002"
    journal = run / f".fps-journal-{pid}-{host}00000003.json"
    temp.write_bytes(b"new mask bytes")
    st = os.stat(temp)
    os.link(final, backup)
    entry = {"final": str(final), "temp": str(temp), "inode": [st.st_dev, st.st_ino], "backup": str(backup)}
    journal.write_text(json.dumps({"pid": pid, "journals": [str(journal)], "entries": [entry]}))
    os.replace(temp, final)


def test_an_earlier_fps_leftover_of_a_dead_local_process_rolls_back_also_in_a_copy(run, tmp_path):
    before = snapshot(run)
    _old_format_crash(run, outputs._HOST, _dead_pid())
    crashed = snapshot(run)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-a", str(run), str(copy)], check=True)
    assert fps("inspect", copy / "mask.safetensors", "--json", cwd=tmp_path).exit_code == 0
    assert snapshot(copy) == before  # absolute paths moved along with the journal: the copy recovers itself
    assert snapshot(run) == crashed
    assert fps("inspect", "mask.safetensors", "--json", cwd=run).exit_code == 0
    assert snapshot(run) == before


def test_an_earlier_fps_journal_of_another_host_is_refused_until_it_is_old(run, monkeypatch):
    before = snapshot(run)
    _old_format_crash(run, "beef", 2)  # another host: its pid says nothing here
    journal = next(n for n in leftovers(run) if n.startswith(".fps-journal-"))
    monkeypatch.setattr(outputs, "LIVE_WAIT_S", 0.1)
    r = fps("inspect", "mask.safetensors", cwd=run)
    assert r.exit_code == 1
    assert r.stderr == (
        f"error: {journal} is an unfinished group write by fps process 2 of an earlier fps version (on this or "
        "another machine); run this command again when it has finished; if none is running, the group is rolled "
        "back once the journal is 60 s old\n"
    )
    old = time.time() - 120
    os.utime(run / journal, (old, old))
    assert fps("inspect", "mask.safetensors", cwd=run).exit_code == 0
    assert snapshot(run) == before
