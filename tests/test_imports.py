"""The package's import structure: every module imports on its own, and ``hf`` and ``models`` do not import each
other (both load weights through ``hub``)."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "fps_cli"
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__main__")


def imported_modules(name: str, package: Path = PACKAGE) -> set[str]:
    """The ``fps_cli`` modules ``name`` imports anywhere in its source (top level, inside functions, and under
    ``TYPE_CHECKING``): a static reading, so an import inside a function counts too."""
    tree = ast.parse((package / f"{name}.py").read_text())
    modules = {p.stem for p in package.glob("*.py")}
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x
                found.update(alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fps_cli."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fps_cli."))
    return found & modules


def reaches(start: str, goal: str, package: Path = PACKAGE) -> list[str] | None:
    """An import path from ``start`` to ``goal`` (module names), or None."""
    paths, seen = [[start]], {start}
    while paths:
        path = paths.pop()
        for nxt in sorted(imported_modules(path[-1], package)):
            if nxt == goal:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                paths.append([*path, nxt])
    return None


def test_hf_and_models_do_not_import_each_other():
    assert "hf" in imported_modules("models")  # models builds hf: models through hf
    assert reaches("hf", "models") is None, " -> ".join(reaches("hf", "models"))
    for helper in ("hub", "errors"):  # what both load through imports neither
        assert reaches(helper, "hf") is None and reaches(helper, "models") is None


def test_no_module_imports_itself_through_others():
    """No import cycle anywhere in the package, counting imports inside functions."""
    cycles = [reaches(b, a) for a in MODULES for b in imported_modules(a) if reaches(b, a)]
    assert not cycles, cycles


def test_the_reading_sees_a_cycle_through_a_function_level_import(tmp_path):
    """The old hf <-> models layout: models imports hf at the top, hf imports models' helpers inside a function."""
    (tmp_path / "models.py").write_text("from .hf import create_hf_model\n")
    (tmp_path / "hf.py").write_text("def create_hf_model(spec):\n    from .models import _ensure_available\n")
    assert reaches("hf", "models", tmp_path) == ["hf", "models"]
    assert reaches("models", "models", tmp_path) == ["models", "hf", "models"]


def test_every_module_imports_on_its_own():
    """Each module imported first, in a fresh interpreter state: none works only because another was imported
    before it. Third-party packages are imported once, then each module in a forked child."""
    script = textwrap.dedent(
        f"""
        import importlib, os, sys
        import torch, timm, numpy, PIL, safetensors  # third-party, shared by the children
        assert not any(m == "fps_cli" or m.startswith("fps_cli.") for m in sys.modules)
        failed = []
        for name in {MODULES!r}:
            pid = os.fork()
            if pid == 0:
                try:
                    importlib.import_module("fps_cli." + name)
                except BaseException as e:
                    print(name, type(e).__name__, e, file=sys.stderr)
                    os._exit(1)
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if status:
                failed.append(name)
        print("failed:", failed)
        sys.exit(1 if failed else 0)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "failed: []" in result.stdout


@pytest.mark.parametrize("module", ["cli", "options", "constants", "errors"])
def test_cheap_modules_import_without_torch(module):
    """The CLI checks its flags (options.py) before anything heavy: these modules never import torch."""
    code = f"import sys, fps_cli.{module}; sys.exit('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr or f"fps_cli.{module} imported torch"
