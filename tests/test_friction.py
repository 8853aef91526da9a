"""A newcomer's friction points (issue 14), each pinned by its message: budgets, help, --json failures, model names,
the offline hint, short runs' warmup, export metadata, plurals, inspect without torch."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DIGITS, REPO, TINY_VIT
from typer.testing import CliRunner

from fps_cli.cli import app

runner = CliRunner()
FAST = ["--num-workers", "0", "--batch-size", "4"]


def fps(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _flat(text: str) -> str:
    """A usage error's text without rich's box and line wrapping."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    """Every command here writes (or would write) into a fresh folder."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def selected(image_folder, tmp_path, monkeypatch) -> Path:
    data = image_folder(classes=3, per_class=4, val_per_class=1)
    monkeypatch.chdir(tmp_path)
    result = fps("select", *TINY_VIT, "--data", data, "--budget", "0.05", "--num-workers", "0", "-q")
    assert result.exit_code == 0, result.output
    return data


# ------------------------------------------------------------------------------------------------- budgets


@pytest.mark.parametrize(
    ("budget", "hint"), [("5", "; did you mean 0.05?"), ("1", "; did you mean 0.01?"), ("0", ""), ("-0.1", "")]
)
def test_one_budget_message_with_the_fraction_meant(tmp_path, budget, hint):
    result = fps("select", *TINY_VIT, "--data", DIGITS, "--budget", budget, "-o", tmp_path / "m.safetensors")
    assert result.exit_code == 2
    expected = (
        f"--budget is a fraction of all parameters, strictly between 0 and 1 (0.05 = 5%), got {float(budget):g}{hint}"
    )
    assert expected in _flat(result.output)
    assert not (tmp_path / "m.safetensors").exists()


def test_library_refuses_the_same_budget_with_the_same_text():
    from fps_cli import SelectOptions
    from fps_cli.errors import BudgetError

    with pytest.raises(BudgetError) as e:
        SelectOptions(budget=5)
    assert str(e.value).endswith("got 5; did you mean 0.05?")


def test_large_budget_warns(tmp_path):
    common = [*TINY_VIT, "--data", DIGITS, "--num-workers", "0", "-o", tmp_path / "m.safetensors", "--no-scores"]
    result = fps("select", *common, "--budget", "0.5")
    assert result.exit_code == 0, result.output
    warning = "warning: --budget 0.5 makes 50% of the parameters trainable; sparse fine-tuning budgets are usually "
    assert warning in result.stderr
    quiet = fps("select", *common, "--budget", "0.05", "--force")
    assert "warning: --budget" not in quiet.stderr


def test_default_budget_on_a_tiny_model_says_why(tmp_path):
    result = fps(
        "select", *TINY_VIT, "--data", DIGITS, "--num-workers", "0", "-o", tmp_path / "m.safetensors", "--no-scores"
    )
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1].startswith(
        "error: the default budget 0.0077 is sized for ViT-B/16 (86 M parameters); on a 300,746-parameter model the "
        "head and biases are a larger share. budget 0.0077 leaves no room"
    )


# ---------------------------------------------------------------------------------------------- help text


@pytest.mark.parametrize("command", ["select", "train", "eval", "merge", "inspect"])
def test_help_shows_no_python_types(command):
    result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    assert "<bool>" not in result.output and "list[" not in result.output


def test_train_help_says_the_mask_gives_the_defaults():
    text = _flat(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output)
    assert "--num-classes <int range> [x>=1] Size of the head (default: as the mask records)." in text
    assert "(needs pip install 'fps-cli[wandb]')" in text


# ---------------------------------------------------------------------------------------- --json failures


def test_json_failure_prints_one_json_object(tmp_path):
    missing = fps("inspect", tmp_path / "nothere.safetensors", "--json")
    assert missing.exit_code == 1
    assert json.loads(missing.stdout) == {"error": f"{tmp_path / 'nothere.safetensors'} does not exist", "exit_code": 1}
    assert missing.stderr == f"error: {tmp_path / 'nothere.safetensors'} does not exist\n"

    usage = fps("select", *TINY_VIT, "--data", DIGITS, "--budget", "5", "--json", "-o", tmp_path / "m.safetensors")
    assert usage.exit_code == 2
    assert json.loads(usage.stdout)["exit_code"] == 2
    assert json.loads(usage.stdout)["error"].endswith("did you mean 0.05?")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["select", "--json", "--bogus"], "No such option: --bogus"),
        (["train", "--epochs", "abc", "--json"], "Invalid value for '--epochs': Input should be a valid integer"),
        (["merge", "--json", "--dtype", "fp8"], "Invalid value for '--dtype'"),
    ],
)
def test_json_parse_errors_print_one_json_object(args, error):
    """click's own parse errors (before the command runs) are a JSON object too, with the usage text on stderr."""
    r = fps(*args)
    assert r.exit_code == 2
    payload = json.loads(r.stdout)
    assert payload["exit_code"] == 2 and payload["error"].startswith(error)
    assert "Usage: fps" in r.stderr
    assert fps(*[a for a in args if a != "--json"]).stdout == ""  # without --json stdout stays empty


def test_from_scores_reports_real_seconds(tmp_path):
    args = [*TINY_VIT, "--data", DIGITS, "--budget", "0.05", "--num-workers", "0"]
    first = fps("select", *args, "-o", tmp_path / "a.safetensors", "--scores", tmp_path / "s.safetensors", "-q")
    assert first.exit_code == 0, first.output
    again = fps(
        "select",
        "--from-scores",
        tmp_path / "s.safetensors",
        "--budget",
        "0.03",
        "-o",
        tmp_path / "b.safetensors",
        "--json",
    )
    assert again.exit_code == 0, again.output
    payload = json.loads(again.stdout)
    assert payload["pass_seconds"] == 0.0  # no data pass
    assert payload["seconds"] > 0  # the command itself: model rebuilt, selection, file written


# ------------------------------------------------------------------------------------------------ models


def test_hub_repo_name_hints_hf_hub(tmp_path):
    args = ["--data", DIGITS, "-o", tmp_path / "m.safetensors", "--no-scores"]
    result = fps("select", "--model", "timm/vit_base_patch16_224.augreg_in21k", *args)
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: unknown model 'timm/vit_base_patch16_224.augreg_in21k'; a Hugging Face hub repo is named "
        "hf-hub:timm/vit_base_patch16_224.augreg_in21k, or the timm name vit_base_patch16_224.augreg_in21k"
    )


def test_offline_error_names_the_repo_to_prefetch(tmp_path):
    args = ["--data", DIGITS, "-o", tmp_path / "m.safetensors", "--no-scores", "--offline"]
    result = fps("select", "--model", "vit_base_patch16_224", *args)
    assert result.exit_code == 1
    last = result.stderr.splitlines()[-1]
    assert last.startswith(
        "error: pretrained weights for vit_base_patch16_224 (the tag augreg2_in21k_ft_in1k, hub repo "
        "timm/vit_base_patch16_224.augreg2_in21k_ft_in1k): not in the local cache"
    )
    assert "prefetch them with `hf download timm/vit_base_patch16_224.augreg2_in21k_ft_in1k`" in last


# ------------------------------------------------------------------------------------------------- train


def test_one_epoch_run_leaves_warmup_and_logs_its_first_step(selected, tmp_path):
    result = fps("train", "--epochs", "1", "--log-every", "100", *FAST, "--json")
    assert result.exit_code == 0, result.output
    log = [json.loads(line) for line in (tmp_path / "delta.metrics.jsonl").read_text().splitlines()]
    steps = [r for r in log if r["event"] == "step"]
    assert steps[0]["step"] == 1  # logged after the first step, not only every --log-every steps
    assert "progress" not in {r["event"] for r in log}  # per-step progress drives the bar only
    assert json.loads(result.stdout)["metrics"]["lr"] < 1e-3  # the cosine decay ran: not stuck at the peak
    assert "1 epoch x 3 steps" in result.stderr
    assert "parameters for 1 epoch (" in fps("train", "--epochs", "1", *FAST, "--force", "-q").stdout


def test_no_pretrained_export_records_no_hub_tag(selected, tmp_path):
    assert fps("train", "--epochs", "1", *FAST, "-q").exit_code == 0
    result = fps("merge", "-o", "export/", "-q")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert "tag" not in config["pretrained_cfg"]
    assert config["architecture"] == "test_vit"


# ----------------------------------------------------------------------------------------------- inspect


def test_inspect_of_a_mask_imports_no_torch(selected, tmp_path):
    code = (
        "import sys; from fps_cli.cli import main; sys.argv = ['fps', 'inspect', 'mask.safetensors', '--json']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, file=sys.stderr)"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kind"] == "mask"
    assert r.stderr.strip().splitlines()[-1] == "False"


def test_progress_bar_shows_rate_and_time_left(monkeypatch):
    import io
    import time

    from fps_cli.cli import Reporter

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with Reporter(quiet=False, as_json=False).progress("scoring") as (on_start, on_advance):
        on_start(64)
        time.sleep(0.05)
        on_advance(32)  # one batch: the rate and the time left show at once
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err.getvalue())
    assert re.search(r"32/64 [\d,.]+ img/s, ETA 0:00:0\d", shown), shown[-300:]


# ------------------------------------------------------------------------------- issue 17: first day


def test_budget_as_a_percentage_is_read_as_the_fraction_with_a_notice(tmp_path):
    from fps_cli.cli import _parse_budget

    assert _parse_budget("0.77%") == 0.0077 and _parse_budget("0.0077") == 0.0077
    common = [*TINY_VIT, "--data", DIGITS, *FAST, "--no-scores", "--json"]
    result = fps("select", *common, "--budget", "5%")
    assert result.exit_code == 0, result.output
    assert "notice: --budget 5% read as the fraction 0.05" in result.stderr
    assert json.loads(result.stdout)["budget"] == 0.05
    bad = fps("select", *common, "--budget", "five%", "--force")
    assert bad.exit_code == 2
    assert "'five%' is not a number; give a fraction (0.0077) or a percentage (0.77%)" in _flat(bad.output)


def test_a_large_budget_warning_suggests_the_percentage_meant(tmp_path):
    result = fps("select", *TINY_VIT, "--data", DIGITS, *FAST, "--no-scores", "--budget", "0.77")
    assert result.exit_code == 0, result.output
    assert "; if you meant 0.77%, that is --budget 0.0077" in result.stderr


def test_a_transformers_repo_name_hints_hf_beside_hf_hub(tmp_path):
    result = fps("select", "--model", "google/vit-base-patch16-224", "--data", DIGITS, "--no-scores")
    assert result.exit_code == 1
    assert result.stderr.splitlines()[-1] == (
        "error: unknown model 'google/vit-base-patch16-224'; a Hugging Face hub repo is named "
        "hf-hub:google/vit-base-patch16-224 (timm weights); a transformers model is hf:google/vit-base-patch16-224 "
        "(pip install 'fps-cli[hf]')"
    )


@pytest.mark.parametrize(
    ("command", "step"),
    [
        ("train", "mask.safetensors does not exist: run fps select first, or pass --mask FILE"),
        ("eval", "delta.safetensors does not exist: run fps train first, or pass --delta FILE"),
        ("merge", "delta.safetensors does not exist: run fps train first, or pass --delta FILE"),
        ("inspect", "mask.safetensors does not exist: run fps select first, or name the files: fps inspect FILE ..."),
    ],
)
def test_a_missing_mask_or_delta_says_the_next_step(command, step):
    result = fps(command)
    assert result.exit_code == 1
    assert result.stderr == f"error: {step}\n"


def test_no_pretrained_is_in_the_header_and_warns_once():
    result = fps("select", *TINY_VIT, "--data", DIGITS, *FAST, "--budget", "0.05", "--no-scores")
    assert result.exit_code == 0, result.output
    assert "fps select: test_vit on " in result.stderr and ", random weights: --no-pretrained)" in result.stderr
    assert result.stderr.count("warning: --no-pretrained: selecting on randomly initialised weights") == 1


def test_timm_train_py_names_are_aliases(selected, tmp_path):
    text = _flat(runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).output)
    for pair in (
        "--optimizer,--opt",
        "--label-smoothing,--smoothing",
        "--grad-accum,--grad-accum-steps",
        "--num-workers,--workers -j",
        "--log-every,--log-interval",
        "--no-augment,--no-aug",
        "--checkpoint,--initial-checkpoint",
        "--precision,--amp-dtype",
        "--batch-size -b",
    ):
        assert pair in text, pair
    timm_names = ["--opt", "sgd", "--smoothing", "0.2", "--grad-accum-steps", "2", "-j", "0", "--log-interval", "1"]
    timm_names += ["--no-aug", "-b", "4", "--amp-dtype", "float32", "--epochs", "1"]
    result = fps("train", *timm_names, "--json")
    assert result.exit_code == 0, result.output
    from fps_cli.formats import read_delta

    config = read_delta(tmp_path / "delta.safetensors").provenance["train_config"]
    assert (config["optimizer"], config["label_smoothing"], config["grad_accum"]) == ("sgd", 0.2, 2)
    assert (config["augment"], config["batch_size"], config["precision"]) == (False, 4, "fp32")


def test_zero_epochs_says_what_the_readme_promises():
    result = runner.invoke(app, ["train", "--epochs", "0"], env={"COLUMNS": "250"})
    assert result.exit_code == 2
    assert (
        "Invalid value for --epochs: must be at least 1, got 0; to evaluate a trained delta without training, use "
        "fps eval" in _flat(result.output)
    )
    readme = (REPO / "README.md").read_text()
    assert "`fps train --epochs 0` is refused; use `fps eval`." in readme


def test_root_help_and_version_show_no_bool_metavar():
    for args in (["--help"], ["--version"]):
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        assert result.exit_code == 0 and "<bool>" not in result.output


def test_inspect_plot_alone_prints_no_report(selected, tmp_path):
    pytest.importorskip("matplotlib")
    result = fps("inspect", "--plot", tmp_path / "m.png")
    assert result.exit_code == 0, result.output
    assert result.stdout == "" and (tmp_path / "m.png").stat().st_size > 1000
    assert f"wrote {tmp_path / 'm.png'}" in result.stderr
    assert "mask.safetensors" in fps("inspect").stdout  # without --plot the report is the result


def test_summary_lr_is_the_lr_the_log_shows_for_the_epoch(selected, tmp_path):
    result = fps("train", "--epochs", "3", "--log-every", "100", *FAST, "-q")
    assert result.exit_code == 0, result.output
    import csv

    log = [json.loads(line) for line in (tmp_path / "delta.metrics.jsonl").read_text().splitlines()]
    with (tmp_path / "delta.summary.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    for row in rows:
        steps = [r for r in log if r["event"] == "step" and r["epoch"] == int(row["epoch"])]
        assert float(row["lr"]) == pytest.approx(steps[-1]["lr"], rel=1e-12)  # the epoch's last step line
    assert len({row["lr"] for row in rows}) == 3  # the schedule moves


def test_select_logs_progress_lines_off_a_terminal():
    result = fps("select", *TINY_VIT, "--data", DIGITS, "--num-workers", "0", "--batch-size", "8", "--budget", "0.05")
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("scoring: ")]
    assert 5 <= len(lines) <= 11
    assert re.fullmatch(r"scoring: 120/120 images \(100%\), [\d,.]+ img/s, ETA 0:00:00", lines[-1]), lines
    assert all(re.search(r"\(\d+%\), [\d,.]+ img/s, ETA \d:\d\d:\d\d$", line) for line in lines)
    quiet = fps("select", *TINY_VIT, "--data", DIGITS, "--num-workers", "0", "--budget", "0.05", "--force", "-q")
    assert "scoring" not in quiet.stderr


def test_progress_bar_shows_the_model_build_as_its_own_step(monkeypatch):
    import io

    from fps_cli.cli import Reporter

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    with Reporter(quiet=False, as_json=False).progress("scoring", preparing="building the model") as (on_start, _):
        before = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err.getvalue())
        on_start(64)
    assert "building the model" in before and "0/?" not in before
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", err.getvalue())
    assert "building the model" in shown and "0/?" not in shown


def test_library_writers_refuse_to_overwrite_unless_asked(selected, tmp_path):
    from fps_cli import read_delta, read_mask, run_merge, save_mask
    from fps_cli.errors import OutputExistsError
    from fps_cli.formats import save_delta
    from fps_cli.inspection import export_dense
    from fps_cli.merge import resolve_target

    mask = read_mask("mask.safetensors")
    before = (tmp_path / "mask.safetensors").read_bytes()
    with pytest.raises(OutputExistsError, match=r"mask.safetensors already exists; pass overwrite=True to replace it"):
        save_mask("mask.safetensors", mask)
    assert (tmp_path / "mask.safetensors").read_bytes() == before
    save_mask("mask.safetensors", mask, overwrite=True)
    save_mask("new.safetensors", mask)  # a new file needs no permission
    export_dense(mask, "dense.safetensors")
    with pytest.raises(OutputExistsError):
        export_dense(mask, "dense.safetensors")
    assert fps("train", "--epochs", "1", *FAST, "-q").exit_code == 0
    delta = read_delta("delta.safetensors")
    with pytest.raises(OutputExistsError):
        save_delta("delta.safetensors", delta)
    run_merge(delta, resolve_target("merged.safetensors"))
    with pytest.raises(OutputExistsError, match=r"merged\.safetensors already exists; pass overwrite=True"):
        run_merge(delta, resolve_target("merged.safetensors"))
    run_merge(delta, resolve_target("merged.safetensors"), overwrite=True)


def test_readme_load_merged_snippet_runs_as_written(selected, tmp_path):
    assert fps("train", "--epochs", "1", *FAST, "-q").exit_code == 0
    text = (REPO / "README.md").read_text()
    start = text.index("```python\nimport timm\nimport torch\n\nfrom fps_cli import load_merged\n")
    code = text[start + len("```python\n") : text.index("```", start + 10)]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # the README's own snippet, run as a user would
    assert scope["logits"].shape == (2, 3)


def test_readme_install_lines_are_commands():
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Install") :]
    block = block[block.index("```bash\n") + 8 : block.index("```", block.index("```bash\n") + 8)]
    for line in block.splitlines():
        command = line.split("#", 1)[0].strip()
        assert command.startswith("pip install "), line
        assert "pip install" not in line.split("#", 1)[1] if "#" in line else True, line
    assert 'pip install -e ".[plot]"' in block
    assert "pip install torch torchvision --index-url https://download.pytorch.org/whl/cpu" in text
