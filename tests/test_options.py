"""The option objects refuse every flag combination the command line refuses, with the same text.

Each case runs ``fps`` through typer's CliRunner and builds the library's ``SelectOptions`` / ``TrainConfig`` from
the same values; both must refuse, the CLI with exit code 2 naming the flag, the library with an ``OptionsError``
carrying that flag and message.
"""

from __future__ import annotations

import json
import math

import pytest
from conftest import DIGITS, TINY_VIT
from typer.testing import CliRunner

from fps_cli.cli import app
from fps_cli.errors import BudgetError, FpsError, OptionsError
from fps_cli.finetune import TrainConfig
from fps_cli.selector import SelectOptions, reselect, run_select

runner = CliRunner()
MODEL_AND_DATA = [*TINY_VIT, "--data", str(DIGITS)]

# (command line after the command name, the library's options from the same values)
SELECT_CASES = {
    "budget not finite": (["--budget", "nan"], dict(budget=math.nan)),
    "budget above 1": (["--budget", "5"], dict(budget=5.0)),
    "budget of 1": (["--budget", "1"], dict(budget=1.0)),
    "budget of 0": (["--budget", "0"], dict(budget=0.0)),
    "budget and topk": (["--budget", "0.05", "--topk-per-neuron", "3"], dict(budget=0.05, topk_per_neuron=3)),
    "topk with granularity": (
        ["--topk-per-neuron", "3", "--granularity", "layer"],
        dict(topk_per_neuron=3, granularity="layer"),
    ),
    "gps loss without gps": (["--method", "fps", "--gps-loss", "ce"], dict(method="fps", gps_loss="ce")),
    "gps loss, default method": (["--gps-loss", "supcon"], dict(gps_loss="supcon")),
    "no-augment without gps": (["--method", "weight", "--no-augment"], dict(method="weight", augment=False)),
    "anchor with weight": (["--method", "weight", "--anchor", "a.safetensors"], dict(method="weight", anchor=True)),
    "anchor with gps": (["--method", "gps", "--anchor", "a.safetensors"], dict(method="gps", anchor=True)),
    "anchor with a baseline": (["--method", "linear", "--anchor", "a.safetensors"], dict(method="linear", anchor=True)),
    "full without biases": (["--method", "full", "--no-train-bias"], dict(method="full", train_bias=False)),
    "bias without biases": (["--method", "bias", "--no-train-bias"], dict(method="bias", train_bias=False)),
}
# Re-selection: no --model / --data needed.
RESELECT_CASES = {
    "baseline from scores": (["--method", "full"], dict(method="full")),
    "gps loss from scores": (["--gps-loss", "ce"], dict(gps_loss="ce")),
    "no-augment from scores": (["--method", "gps", "--no-augment"], dict(method="gps", augment=False)),
}
TRAIN_CASES = {
    "lr infinite": (["--lr", "inf"], dict(lr=math.inf)),
    "lr zero": (["--lr", "0"], dict(lr=0.0)),
    "clip-grad zero": (["--clip-grad", "0"], dict(clip_grad=0.0)),
    "clip-grad beyond float32": (["--clip-grad", "1e39"], dict(clip_grad=1e39)),
    "weight decay infinite": (["--weight-decay", "inf"], dict(weight_decay=math.inf)),
    "warmup beyond float32": (["--warmup-epochs", "1e39"], dict(warmup_epochs=1e39)),
    "first problem wins": (["--lr", "0", "--clip-grad", "0"], dict(lr=0.0, clip_grad=0.0)),
}


def cli_error(*args: str) -> str:
    """The usage error ``fps`` reports under ``--json`` (one JSON object on stdout), after checking the exit code
    and that the human box says the same."""
    plain = runner.invoke(app, list(args))
    assert plain.exit_code == 2, plain.output
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 2, result.output
    error = json.loads(result.output.splitlines()[0])
    assert error["exit_code"] == 2
    box = " ".join(line.strip("│ ") for line in plain.output.splitlines() if line.startswith("│"))
    assert " ".join(error["error"].split()) == " ".join(box.split())
    return error["error"]


def library_error(factory, **kwargs) -> OptionsError:
    with pytest.raises(OptionsError) as e:
        factory(**kwargs)
    assert isinstance(e.value, FpsError) and isinstance(e.value, ValueError)
    return e.value


def as_cli_prints(e: OptionsError) -> str:
    """How click words a usage error: ``Invalid value for FLAG: MESSAGE`` (``Invalid value: MESSAGE`` without a
    flag)."""
    return f"Invalid value for {e.flag}: {e.message}" if e.flag else f"Invalid value: {e.message}"


@pytest.mark.parametrize("case", SELECT_CASES)
def test_select_options_refuse_what_fps_select_refuses(case, tmp_path):
    args, kwargs = SELECT_CASES[case]
    printed = cli_error("select", *MODEL_AND_DATA, *args, "-o", str(tmp_path / "m.safetensors"))
    assert printed == as_cli_prints(library_error(SelectOptions, **kwargs))
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("case", RESELECT_CASES)
def test_select_options_refuse_what_a_reselection_refuses(case, tmp_path):
    args, kwargs = RESELECT_CASES[case]
    printed = cli_error("select", "--from-scores", str(tmp_path / "scores.safetensors"), *args)
    assert printed == as_cli_prints(library_error(SelectOptions, from_scores=True, **kwargs))


@pytest.mark.parametrize("case", TRAIN_CASES)
def test_train_config_refuses_what_fps_train_refuses(case, tmp_path):
    args, kwargs = TRAIN_CASES[case]
    printed = cli_error("train", "--mask", str(tmp_path / "none.safetensors"), *args)
    assert printed == as_cli_prints(library_error(TrainConfig, **kwargs))


def test_the_library_message_names_the_flag():
    e = library_error(SelectOptions, method="fps", gps_loss="ce")
    assert e.flag == "--gps-loss" and str(e) == "--gps-loss: --gps-loss only applies to --method gps"
    budget = library_error(SelectOptions, budget=5)
    assert isinstance(budget, BudgetError) and budget.flag is None and str(budget) == budget.message


def test_what_the_options_accept():
    assert SelectOptions().budget == 0.0077  # the default budget when no topk is given
    assert SelectOptions(topk_per_neuron=4).budget is None
    assert SelectOptions(method="gps").loss == "supcon" and SelectOptions(method="gps").gps_loss is None
    assert SelectOptions(method="gps", gps_loss="ce", augment=False).loss == "ce"
    assert SelectOptions(from_scores=True, method="gps").from_scores  # gps re-selection: the file keeps its settings
    assert SelectOptions(method="activation", anchor=True).anchor
    assert SelectOptions(method="linear", train_bias=False).baseline  # linear probing trains no bias anyway
    assert TrainConfig(lr=1e-2, clip_grad=1.0).clip_grad == 1.0


def test_library_entry_points_check_the_anchor_and_baselines(tmp_path):
    """run_select and reselect refuse an anchor for a method without an activation statistic, and a baseline
    (which has no scores), before reading any file."""
    missing = tmp_path / "nothing.safetensors"
    with pytest.raises(OptionsError, match="--anchor scales the activation statistic of fps and activation, not of"):
        reselect(missing, SelectOptions(method="weight"), anchor=missing)
    with pytest.raises(ValueError, match="fixed trainable set"):
        run_select(None, missing, SelectOptions(method="full"))
