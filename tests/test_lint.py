"""The code passes the project's linter (ruff, configured in pyproject.toml).

ruff is looked for on PATH, next to the running interpreter (a virtual environment that is
not activated) and as ``python -m ruff``. If it is nowhere the test fails, saying how to
install it (the dev extra): a lint check that silently skips checks nothing. Set
``MFLD_SKIP_LINT=1`` to turn that failure into an expected failure (xfail) whose reason the
summary line prints.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def ruff_command() -> list[str] | None:
    exe = shutil.which("ruff") or shutil.which("ruff", path=str(Path(sys.executable).parent))
    if exe:
        return [exe]
    if importlib.util.find_spec("ruff") is not None:
        return [sys.executable, "-m", "ruff"]
    return None


def test_ruff_is_clean():
    cmd = ruff_command()
    if cmd is None:
        reason = (f"ruff not found (not on PATH, not next to {sys.executable}, not importable): "
                  "pip install -e '.[dev]'")
        if os.environ.get("MFLD_SKIP_LINT") == "1":
            pytest.xfail(reason)
        pytest.fail(reason + " -- or set MFLD_SKIP_LINT=1 to record it as an expected failure")
    out = subprocess.run([*cmd, "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
