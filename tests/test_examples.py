"""The README's Python example and the scripts in examples/ run, and say what they claim."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_python_blocks():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, re.S)


def test_readme_example_is_the_quickstart_script():
    blocks = _readme_python_blocks()
    assert blocks, "README has no python example"
    script = (ROOT / "examples" / "quickstart.py").read_text()
    assert blocks[0] in script  # the executed script is literally the README's example


def test_quickstart_runs_and_learns(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    ns = runpy.run_path(str(ROOT / "examples" / "quickstart.py"), run_name="__main__")
    hist, res, run = ns["history"], ns["res"], ns["run"]
    # 500 steps of eta = 0.05: t = 25, recorded every 50 steps including step 0.
    assert hist["t"][-1] == pytest.approx(25.0)
    assert len(hist["t"]) == 11
    # Training reduces the risk of the teacher-student problem (initial risk ~ E y^2 / 2 plus
    # the random network's output; after t = 25 the fit is far below it).
    assert hist["risk"][-1] < 0.5 * hist["risk"][0]
    # load_run returns exactly what the run wrote (round-trip float format).
    np.testing.assert_array_equal(run.metrics["risk"], res.metrics["risk"])
    assert run.a.shape == (run.config["model"]["n_particles"],) and run.w.shape == (run.a.shape[0], 2)
    assert (tmp_path / "runs" / "quickstart" / "figures" / "function.png").exists()


def test_own_data_example(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(ROOT / "examples" / "own_data.py"), run_name="__main__")
    out = capsys.readouterr().out
    m = re.search(r"train accuracy ([0-9.]+), test accuracy ([0-9.]+)", out)
    assert m, out
    # Two half-moons with 0.15 noise are separable to ~95%; a trained network must beat a
    # coin flip by a wide margin on both splits (chance is 0.5).
    assert float(m.group(1)) > 0.85 and float(m.group(2)) > 0.8
