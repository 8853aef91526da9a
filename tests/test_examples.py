"""The README's set-up command and the examples run as documented."""

from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO


def test_quickstart_script_runs_end_to_end(tmp_path):
    env = {**os.environ, "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(
        ["bash", str(REPO / "examples" / "quickstart.sh"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for output in ("mask.safetensors", "mask_2pct.safetensors", "delta.safetensors", "merged/model.safetensors"):
        assert (tmp_path / output).exists(), output
    assert "selected entries in" in r.stdout
    assert "merged folder reproduces the fine-tuned model" in r.stdout


def test_readme_names_the_commands_ci_runs():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert 'pip install -e ".[dev]" && pytest' in readme
    assert 'pip install -e ".[dev]"' in ci and "\npytest" in ci
    assert "pip install -e . && bash examples/quickstart.sh" in readme
