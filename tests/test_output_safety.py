"""Nothing a user already has is ever lost (issue 11): every write of every command through ``fps_cli.outputs``.

Each case drives the real ``fps`` command (in-process through typer's CliRunner, or as a subprocess where it is
killed, stopped or raced), and pins the exit code, the one-line message and the exact set and bytes of the files
before and after. Built files are shared at module scope: test_vit at 32x32 on 12 images, one training epoch.
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
import torch
from conftest import CLASS_COLORS, REPO, TINY_VIT, tiny_hf_vit, wait_stopped, write_images
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from fps_cli import __version__
from fps_cli.cli import app

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]
SELECT = ["select", *TINY_VIT, "--budget", "0.05", *FAST, "-q"]
TRAIN = ["train", "--epochs", "1", *FAST, "-q"]


def fps(*args: object, cwd: Path | None = None):
    """The command in this process, with a wide terminal so that a usage error's box does not wrap its line."""
    old = Path.cwd()
    if cwd is not None:
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


def fps_process(*args: object, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """The command as a real process (``python -m fps_cli``), e.g. with a crash hook in its environment."""
    cmd = [sys.executable, "-m", "fps_cli", *(str(a) for a in args)]
    return subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=300)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (hidden ones too), by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: "), stderr
    return lines[0]


def usage_line(result) -> str:
    """The message of a usage error (exit 2), out of click's box."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    return " ".join(line.strip("│ ").strip() for line in result.stderr.splitlines() if line.startswith("│"))


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """A data folder (3 classes, 4 + 2 images each), a mask + scores of test_vit on it, and a one-epoch delta."""
    root = tmp_path_factory.mktemp("built")
    data = root / "data"
    for c in range(3):
        write_images(data / "train" / f"class_{c}", 4, CLASS_COLORS[c], seed=c)
        write_images(data / "val" / f"class_{c}", 2, CLASS_COLORS[c], seed=100 + c)
    work = root / "run"
    work.mkdir()
    assert fps(*SELECT, "--data", data, cwd=work).exit_code == 0
    trained = fps(*TRAIN, cwd=work)
    assert trained.exit_code == 0, trained.output
    return root


@pytest.fixture
def run(built, tmp_path) -> Path:
    """A copy of the built run folder: mask, scores, delta and its metrics log."""
    shutil.copytree(built / "run", tmp_path / "run")
    return tmp_path / "run"


def data_of(built: Path) -> Path:
    return built / "data"


# ----------------------------------------------------------------------------------------------- 1. folders


@pytest.fixture(scope="module")
def hf_run(tmp_path_factory) -> Path:
    """Issue case 1 as the user made it: an hf: tiny random ViT, `select` and `train` into run1/, plus notes.txt."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    tiny_hf_vit(root / "tinyvit", layers=1)
    data = root / "data"
    for c in range(3):
        write_images(data / f"class_{c}", 3, CLASS_COLORS[c], seed=c)
    (root / "run1").mkdir()
    model = f"hf:{root / 'tinyvit'}"
    args = ["-o", "run1/mask.safetensors", "--scores", "run1/scores.safetensors"]
    assert (
        fps("select", "--model", model, "--data", data, *args, "--budget", "0.2", *FAST, "-q", cwd=root).exit_code == 0
    )
    r = fps("train", "--mask", "run1/mask.safetensors", "-o", "run1/delta.safetensors", *TRAIN[1:], cwd=root)
    assert r.exit_code == 0, r.output
    (root / "run1" / "notes.txt").write_text("x\n")
    return root


HF_FILES = {"config.json", "model.safetensors", "preprocessor_config.json"}
# What a finished `fps train -o delta.safetensors` leaves: the delta, its metrics log and timm's run records.
RUN_FILES = ("delta.safetensors", "delta.metrics.jsonl", "delta.summary.csv", "delta.args.yaml")


def test_hf_merge_into_a_folder_keeps_every_file_fps_did_not_write(hf_run, tmp_path):
    root = tmp_path / "hf"
    shutil.copytree(hf_run, root)
    folder = root / "run1"
    before = snapshot(folder)
    assert set(before) == {
        "mask.safetensors",
        "scores.safetensors",
        *RUN_FILES,
        "notes.txt",
    }

    refused = fps("merge", "--delta", "run1/delta.safetensors", "-o", "run1/", cwd=root)
    assert refused.exit_code == 1
    assert one_error_line(refused.stderr) == (
        "error: run1 is not empty (it holds delta.args.yaml, delta.metrics.jsonl, delta.safetensors and 4 more); "
        "pass --force to write into it (only config.json, model.safetensors, preprocessor_config.json are "
        "replaced; other files stay)"
    )
    assert snapshot(folder) == before

    merged = fps("merge", "--delta", "run1/delta.safetensors", "-o", "run1/", "--force", "-q", cwd=root)
    assert merged.exit_code == 0, merged.output
    after = snapshot(folder)
    assert set(after) == set(before) | HF_FILES  # nothing else, no temporaries
    assert {k: after[k] for k in before} == before  # every file fps did not write: bit for bit

    # The same from inside the folder, with -o ./ (was a traceback and an empty ..xxxx.old folder).
    again = fps("merge", "--delta", "delta.safetensors", "-o", "./", "--force", "-q", cwd=folder)
    assert again.exit_code == 0, again.output
    assert snapshot(folder) == after  # the same merge gives the same bytes
    assert sorted(p.name for p in root.iterdir()) == ["data", "run1", "tinyvit"]  # nothing beside it either

    # The base model's own folder is an input: merging into it is a usage error that names both.
    args = ["--delta", "run1/delta.safetensors", "--model", "hf:tinyvit", "-o", "tinyvit/", "--force"]
    clash = fps("merge", *args, cwd=root)
    assert usage_line(clash) == (
        "Invalid value for --out: --out tinyvit/ is also an input (--model tinyvit); choose another output path"
    )


def test_timm_folder_needs_force_and_keeps_other_files(run):
    export = run / "export"
    export.mkdir()
    (export / "README.md").write_text("mine\n")
    before = snapshot(run)
    refused = fps("merge", "-o", "export", cwd=run)
    assert refused.exit_code == 1
    assert one_error_line(refused.stderr) == (
        "error: export is not empty (it holds README.md); pass --force to write into it (only model.safetensors, "
        "config.json are replaced; other files stay)"
    )
    assert snapshot(run) == before
    assert fps("merge", "-o", "export", "--force", "-q", cwd=run).exit_code == 0
    assert sorted(p.name for p in export.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (export / "README.md").read_text() == "mine\n"


# ----------------------------------------------------------------------------------------- 2, 3. train's unit


def test_train_force_never_deletes_an_input_named_like_its_checkpoint(run):
    (run / "weights.ckpt").write_bytes(b"user weights")
    before = snapshot(run)
    r = fps("train", "--checkpoint", "weights.ckpt", "-o", "weights.safetensors", "--force", *FAST, cwd=run)
    assert usage_line(r) == (
        "Invalid value for --out: the training checkpoint (beside --out) weights.ckpt is also an input "
        "(--checkpoint weights.ckpt); choose another output path"
    )
    assert snapshot(run) == before


def test_train_out_may_not_be_its_own_checkpoint(run):
    before = snapshot(run)
    r = fps("train", "-o", "out.ckpt", *FAST, cwd=run)
    assert usage_line(r) == (
        "Invalid value for --out: --out out.ckpt and the training checkpoint (beside --out) out.ckpt name the same file"
    )
    assert snapshot(run) == before


def test_select_outputs_clash_with_each_other_and_inputs(run):
    before = snapshot(run)
    reselect = ["select", "--from-scores", "scores.safetensors", "--budget", "0.1", "-o", "m.safetensors"]
    same = fps(*reselect, "--scores", "m.safetensors", cwd=run)
    assert same.exit_code == 0  # --from-scores writes no score file, so --scores is not an output
    (run / "m.safetensors").unlink()
    both = fps(*SELECT, "--data", "x", "-o", "a.safetensors", "--scores", "a.safetensors", cwd=run)
    assert (
        usage_line(both)
        == "Invalid value for --scores: --out a.safetensors and --scores a.safetensors name the same file"
    )
    plot = fps("inspect", "mask.safetensors", "--plot", "mask.svg", "--export-dense", "mask.svg", cwd=run)
    assert "--plot mask.svg and --export-dense mask.svg name the same file" in usage_line(plot)
    assert snapshot(run) == before


# ---------------------------------------------------------------------------------------- 4. two writers race


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to see a stopped process")
def test_two_writers_of_the_same_new_path_one_fails(run, built):
    """Writer A stops with its files complete but not renamed; B writes the same new paths; A goes on and loses."""
    args = ["select", *TINY_VIT, "--data", data_of(built), "--budget", "0.1", *FAST, "-q"]
    out = ["-o", "new.safetensors", "--scores", "new_scores.safetensors"]
    cmd = [sys.executable, "-m", "fps_cli", *(str(a) for a in [*args, *out])]
    first = subprocess.Popen(cmd, cwd=run, env=_env(FPS_TEST_STOP_AT="written"), stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(first.pid)
        second = fps(*args, *out, cwd=run)
        assert second.exit_code == 0, second.output
        won = snapshot(run)
        os.kill(first.pid, signal.SIGCONT)
        _, stderr = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 1
    assert one_error_line(stderr) == "error: new_scores.safetensors already exists; pass --force to replace it"
    # The winner's files, and no temporary of either (those in `won` were the stopped loser's).
    assert snapshot(run) == {k: v for k, v in won.items() if not k.startswith(".")}


# ------------------------------------------------------------------------------- 5. kill -9 between renames


@pytest.mark.parametrize("point", ["written", "journal", "rename:1", "renamed", "committed"])
def test_select_killed_at_any_write_boundary_leaves_all_old_or_all_new(run, built, point):
    before = snapshot(run)
    args = ["select", *TINY_VIT, "--data", data_of(built), "--budget", "0.1", *FAST, "-q", "--force"]
    killed = fps_process(*args, cwd=run, FPS_TEST_CRASH_AT=point)
    assert killed.returncode == -signal.SIGKILL
    left = {name for name in snapshot(run) if name.startswith(".")}
    assert left  # recognisable leftovers: .<name>.fps-tmp-<pid>-..., .fps-journal-<pid>-....json, the writer's lock
    assert all(".fps-tmp-" in n or ".fps-old-" in n or n.startswith((".fps-journal-", ".fps-lock-")) for n in left)

    # The next fps command that looks there settles it: any read of a file in the folder.
    assert fps("inspect", "mask.safetensors", "--json", cwd=run).exit_code == 0
    after = snapshot(run)
    if point == "committed":  # past the commit point: all new
        assert set(after) == set(before)
        assert after["mask.safetensors"] != before["mask.safetensors"]
        with safe_open(run / "mask.safetensors", "pt") as f:
            assert json.loads(f.metadata()["fps.budget"]) == 0.1
    else:
        assert after == before  # all old, bit for bit, and no leftovers


def test_timm_folder_merge_killed_between_its_two_renames(run):
    assert fps("merge", "-o", "export/", "--dtype", "bf16", "-q", cwd=run).exit_code == 0
    before = snapshot(run)
    killed = fps_process("merge", "-o", "export/", "--force", "-q", cwd=run, FPS_TEST_CRASH_AT="rename:1")
    assert killed.returncode == -signal.SIGKILL
    again = fps("merge", "-o", "export/", "--dtype", "bf16", "-q", cwd=run)  # its checks settle the folder first
    assert again.exit_code == 1
    assert one_error_line(again.stderr) == (
        "error: export already holds model.safetensors and config.json; pass --force to replace them"
    )
    assert snapshot(run) == before


def test_train_killed_before_its_first_checkpoint_can_simply_be_rerun(run):
    for name in RUN_FILES:
        (run / name).unlink()
    before = snapshot(run)
    killed = fps_process(*TRAIN, cwd=run, FPS_TEST_CRASH_AT="rename:1@1")  # half of the first checkpoint commit
    assert killed.returncode == -signal.SIGKILL
    rerun = fps(*TRAIN, cwd=run)
    assert rerun.exit_code == 0, rerun.output
    assert set(snapshot(run)) == set(before) | set(RUN_FILES)


def test_train_force_keeps_the_old_run_until_its_first_checkpoint(run):
    before = snapshot(run)
    # Killed while committing its first checkpoint (both renamed, journal still there): the finished run's delta
    # and log come back untouched; the log was not emptied at the start either.
    killed = fps_process(*TRAIN, "--force", cwd=run, FPS_TEST_CRASH_AT="renamed@1")
    assert killed.returncode == -signal.SIGKILL
    assert fps("inspect", "delta.safetensors", cwd=run).exit_code == 0
    assert snapshot(run) == before


def test_train_force_keeps_the_old_delta_until_the_new_delta_exists(run):
    before = snapshot(run)
    # Killed after its first checkpoint: the new run has its checkpoint and log; the old delta stays until a new
    # delta replaces it.
    killed = fps_process(*TRAIN, "--epochs", "2", "--force", cwd=run, FPS_TEST_CRASH_AT="written@2")
    assert killed.returncode == -signal.SIGKILL
    assert fps("inspect", "delta.safetensors", cwd=run).exit_code == 0
    after = snapshot(run)
    assert set(after) == set(before) | {"delta.ckpt"}
    assert after["delta.safetensors"] == before["delta.safetensors"]
    log = [json.loads(line) for line in after["delta.metrics.jsonl"].decode().splitlines()]
    events = [e["event"] for e in log]  # the first epoch only: start, its step lines, its end
    assert events[0] == "start" and events[-1] == "epoch" and set(events[1:-1]) == {"step"} and log[0]["epochs"] == 2
    assert (run / "delta.ckpt").stat().st_mode & 0o777 == 0o666 & ~_umask()  # not 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------------------------ 7. --resume


def test_resume_refuses_another_data_folder_or_mask(run, built, tmp_path):
    for name in RUN_FILES:
        (run / name).unlink()
    killed = fps_process(*TRAIN, "--epochs", "2", cwd=run, FPS_TEST_CRASH_AT="written@2")
    assert killed.returncode == -signal.SIGKILL
    other = tmp_path / "other"
    shutil.copytree(data_of(built), other)
    assert fps("inspect", "mask.safetensors", "-q", cwd=run).exit_code == 0  # settles the killed commit
    before = snapshot(run)

    r = fps(*TRAIN, "--epochs", "2", "--resume", "--data", other, cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == (
        f"error: checkpoint delta.ckpt is from a run on other inputs (--data {data_of(built).resolve()} -> "
        f"{other.resolve()}); resume with the same inputs, or start over with --force"
    )
    other_mask = fps(
        "select", "--from-scores", "scores.safetensors", "--budget", "0.1", "-o", "m2.safetensors", cwd=run
    )
    assert other_mask.exit_code == 0
    r = fps(*TRAIN, "--epochs", "2", "--resume", "--mask", "m2.safetensors", cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == (
        f"error: checkpoint delta.ckpt is from a run on other inputs (--mask {(run / 'mask.safetensors').resolve()} "
        f"-> {(run / 'm2.safetensors').resolve()}); resume with the same inputs, or start over with --force"
    )
    (run / "m2.safetensors").unlink()
    assert snapshot(run) == before
    assert fps(*TRAIN, "--epochs", "2", "--resume", cwd=run).exit_code == 0


# ------------------------------------------------------------------------------- 8. one line, never a traceback


def _rewrite(path: Path, out: Path, *, metadata: dict[str, str] | None = None, tensors: dict | None = None) -> None:
    with safe_open(path, "pt") as f:
        meta = {**f.metadata(), **(metadata or {})}
    save_file({**load_file(path), **(tensors or {})}, out, metadata=meta)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("fps.model", "42", "fps.model must be a string, got 42"),
        ("fps.img_size", '"abc"', 'fps.img_size must be a positive integer or null, got "abc"'),
        ("fps.num_classes", "true", "fps.num_classes must be a positive integer or null, got true"),
    ],
)
def test_header_values_of_the_wrong_type(run, key, value, message):
    _rewrite(run / "mask.safetensors", run / "bad.safetensors", metadata={key: value})
    before = snapshot(run)
    r = fps("train", "--mask", "bad.safetensors", "-o", "x.safetensors", *FAST, cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == f"error: bad.safetensors has header values of the wrong type: {message}"
    assert snapshot(run) == before


def test_format_version_zero_is_refused(run):
    _rewrite(run / "mask.safetensors", run / "v0.safetensors", metadata={"fps.format_version": "0"})
    r = fps("inspect", "v0.safetensors", cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == (
        f"error: v0.safetensors has format version '0'; this fps_cli {__version__} reads version 1"
    )


def _first_count(path: Path) -> str:
    return next(k for k in load_file(path) if k.endswith("::count"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("nan", "::abs_sum holds NaN, infinite or negative values"),
        ("zero", "::count must be positive, got 0"),
        ("negative", "::count must be positive, got -3"),
        ("float", "::count must be one integer, got torch.float32 [1]"),
    ],
)
def test_bad_score_files_are_one_line(run, change, message):
    scores = run / "scores.safetensors"
    count = _first_count(scores)
    name = count.removesuffix("::count")
    tensors = load_file(scores)
    edit = {
        "nan": {f"{name}::abs_sum": torch.full_like(tensors[f"{name}::abs_sum"], float("nan"))},
        "zero": {count: torch.tensor([0])},
        "negative": {count: torch.tensor([-3])},
        "float": {count: torch.tensor([2.5])},
    }[change]
    _rewrite(scores, run / "bad.safetensors", tensors=edit)
    before = snapshot(run)
    r = fps("select", "--from-scores", "bad.safetensors", "--budget", "0.03", "-o", "m.safetensors", cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == f"error: bad.safetensors is not a valid score file: {name}{message}"
    assert snapshot(run) == before


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("1e39", "Invalid value for --lr: must be a finite number within float32 range, got 1e+39"),
        ("inf", "Invalid value for --lr: must be a finite number within float32 range, got inf"),
        ("nan", "Invalid value for '--lr': Input should be greater than or equal to 0"),  # click's own check
        ("-inf", "Invalid value for '--lr': Input should be greater than or equal to 0"),
    ],
)
def test_non_finite_or_overflowing_options_are_usage_errors(run, value, message):
    before = snapshot(run)
    r = fps("train", "--lr", value, "-o", "x.safetensors", cwd=run)
    assert usage_line(r) == message
    r = fps("train", "--clip-grad", value.lstrip("-"), "-o", "x.safetensors", cwd=run)
    assert r.exit_code == 2
    r = fps("select", "--from-scores", "scores.safetensors", "--budget", value, "-o", "m.safetensors", cwd=run)
    assert r.exit_code == 2
    assert snapshot(run) == before


def test_raw_pickle_checkpoint_is_one_line(run, built):
    import pickle

    (run / "raw.pkl").write_bytes(pickle.dumps({"w": [1, 2]}))
    r = fps(*SELECT, "--data", data_of(built), "--checkpoint", "raw.pkl", "-o", "m.safetensors", "--no-scores", cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr).startswith("error: cannot read checkpoint raw.pkl: Weights only load failed")


# ------------------------------------------------------------------------------------- 9. non-finite values


def test_eval_refuses_a_delta_holding_nan_as_merge_does(run):
    delta = run / "delta.safetensors"
    name = next(k for k in load_file(delta) if k.endswith("::values"))
    values = load_file(delta)[name].clone()
    values[0] = float("nan")
    _rewrite(delta, run / "nan.safetensors", tensors={name: values})
    before = snapshot(run)
    r = fps("eval", "--delta", "nan.safetensors", *FAST, "-q", cwd=run)
    assert r.exit_code == 1
    param = name.removesuffix("::values")
    assert one_error_line(r.stderr) == f"error: nan.safetensors holds NaN or infinite values in 1 tensors ({param})"
    m = fps("merge", "--delta", "nan.safetensors", "-o", "m.safetensors", "-q", cwd=run)
    assert m.exit_code == 1
    assert "NaN or infinite" in one_error_line(m.stderr)
    assert snapshot(run) == before


def test_nan_validation_loss_stops_training(run, monkeypatch):
    from fps_cli import finetune

    evaluate = finetune.evaluate

    def nan_validation(*a, **k):  # the model's validation loss overflows; training loss stays finite
        return {**evaluate(*a, **k), "loss": float("nan")}

    monkeypatch.setattr(finetune, "evaluate", nan_validation)
    before = snapshot(run)
    r = fps(*TRAIN, "-o", "n.safetensors", cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == (
        "error: validation loss is nan at epoch 1, step 3; training stopped. no epoch completed, so there is no "
        "checkpoint: rerun with a lower --lr, or set --clip-grad"
    )
    assert snapshot(run) == before  # nothing of the stopped run


def test_writes_are_fsynced_before_the_rename(run, built, monkeypatch):
    synced = []
    fsync = os.fsync

    def recording_fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    r = fps(*SELECT, "--data", data_of(built), "-o", "f.safetensors", "--scores", "fs.safetensors", cwd=run)
    assert r.exit_code == 0, r.output
    names = [Path(p).name for p in synced]
    assert any(n.startswith(".f.safetensors.fps-tmp-") for n in names)
    assert any(n.startswith(".fs.safetensors.fps-tmp-") for n in names)
    assert any(".fps-journal-" in n for n in names)
    assert str(run) in synced  # the directory, after the renames


# --------------------------------------------------------------------------- OS errors: full disk, read-only


def test_full_disk_is_one_line_naming_the_path(run, built, tmpfs):
    disk = tmpfs("full", "size=256k")
    (disk / "filler").write_bytes(b"\0" * (256 * 1024 - 8192))  # a few KiB left: the score file does not fit
    before = snapshot(disk)
    out = ["-o", disk / "mask.safetensors", "--scores", disk / "scores.safetensors"]
    r = fps(*SELECT, "--data", data_of(built), *out, cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == f"error: cannot write {disk / 'scores.safetensors'}: No space left on device"
    assert snapshot(disk) == before

    # torch.save of the training checkpoint (two chained C++ errors before).
    r = fps(*TRAIN, "-o", disk / "delta.safetensors", cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == f"error: cannot write {disk / 'delta.ckpt'}: No space left on device"
    assert snapshot(disk) == before


def test_read_only_folder_is_one_line_naming_the_path(run, tmpfs):
    ro = tmpfs("ro", "ro,size=64k")
    r = fps("merge", "-o", ro / "merged.safetensors", "-q", cwd=run)
    assert r.exit_code == 1
    assert one_error_line(r.stderr) == f"error: cannot write {ro / 'merged.safetensors'}: Read-only file system"
    assert snapshot(ro) == {}
