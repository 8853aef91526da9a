"""benchmarks/transfer.py --quick: every method, through the real CLI, gives a test accuracy (slow: ~2 minutes)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.mark.slow
def test_transfer_quick_gives_every_method_a_number(tmp_path):
    out = tmp_path / "transfer"
    subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "transfer.py"), "--quick", "--out-dir", str(out)],
        check=True,
        timeout=180,  # the --quick budget
        capture_output=True,
    )
    report = json.loads((out / "transfer.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"full", "linear", "bias", "random", "weight", "activation", "fps", "gps"}
    for row in rows.values():
        assert math.isfinite(row["top1_mean"]) and 0 <= row["top1_mean"] <= 100
        assert row["trainable_percent"] > 0 and row["select_seconds"] > 0
    assert rows["full"]["trainable_percent"] == 100.0
    assert rows["linear"]["trainable_percent"] < rows["bias"]["trainable_percent"] < rows["fps"]["trainable_percent"]
    assert "## Transfer on digits (CPU)" in (out / "transfer.md").read_text()
