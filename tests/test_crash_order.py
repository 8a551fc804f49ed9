"""Crash safety by fault injection: a run stopped between any two of its writes leaves a
directory that reads back consistently and resumes to the uninterrupted run, bit for bit.

Every file of a run is written through :func:`mfld.app.rundir.atomic_write_bytes`. The test
counts a clean run's writes, then for every k stops a fresh run right after its k-th write
(the (k+1)-th and every later write raise, as if the process had been killed there) and
checks the directory:

- the order of the writes: metrics.csv before every checkpoint.npz (so metrics.csv always
  reaches the checkpoint), the marker before config.yaml and env.json;
- whatever is on disk reads back through the checked readers (config.yaml and env.json
  against the marker's integrity record included) and the checkpoint's step has a row in
  metrics.csv;
- ``mfld run --resume`` finishes it with the uninterrupted run's particles, key and metrics
  (wall_time aside).

Deterministic, unlike a SIGKILL at a random moment (tests/test_resume.py): reversing the
order of the metrics and checkpoint writes fails at the crash point between them, every time.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from mfld import config as cfgmod
from mfld.app import run_figures, rundir
from mfld.cli import main

ARGS = ["--set", "model.n_particles=24", "--set", "dynamics.steps=60", "--set", "record.every=10",
        "--set", "record.checkpoint_every=20", "--set", "record.certify_every=0", "--set", "record.optimum=false",
        "--quiet"]


class Crash(BaseException):
    """The injected stop (a BaseException, like the KeyboardInterrupt of a kill)."""


def _stub_figures(out_dir, **kw):
    """One small file instead of the matplotlib figures (same write path, much faster)."""
    rundir.atomic_write_bytes(Path(out_dir) / "figures" / "stub.png", b"\x89PNG stub")
    return ["stub.png"]


def _writes(monkeypatch, crash_after: int | None):
    """Route every atomic write through a counter; from write ``crash_after + 1`` on, raise."""
    log = []
    orig = rundir.atomic_write_bytes

    def counted(path, data):
        if crash_after is not None and len(log) >= crash_after:
            raise Crash(f"stopped before writing {Path(path).name}")
        log.append(Path(path).name)
        orig(path, data)

    monkeypatch.setattr(rundir, "atomic_write_bytes", counted)
    return log


def _metrics_text(run_dir: Path) -> list[list[str]]:
    with open(run_dir / rundir.METRICS, newline="") as f:
        rows = list(csv.reader(f))
    drop = rows[0].index("wall_time")
    return [r[:drop] + r[drop + 1:] for r in rows]


def _consistent(run_dir: Path):
    """What a crash may leave, read back through the checked readers."""
    marker = rundir.read_marker(run_dir)
    if (run_dir / rundir.CONFIG).exists():
        assert marker is not None, "config.yaml without the marker"
        rundir.check_integrity(run_dir, rundir.CONFIG, rundir.read_config(run_dir / rundir.CONFIG), marker)
    if (run_dir / rundir.ENV).exists():
        rundir.check_integrity(run_dir, rundir.ENV, rundir.read_json(run_dir / rundir.ENV), marker)
    if (run_dir / rundir.CHECKPOINT).exists():
        step = int(rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)["step"])
        assert (run_dir / rundir.METRICS).exists(), f"checkpoint at step {step} but no metrics.csv"
        steps = rundir.read_metrics(run_dir / rundir.METRICS)["step"]
        assert step in steps, f"checkpoint at step {step} but metrics.csv has {list(steps)}"
    if (run_dir / rundir.SUMMARY).exists():
        rundir.read_json(run_dir / rundir.SUMMARY)
    assert not [p.name for p in run_dir.iterdir() if rundir.TEMP_PATTERN.match(p.name)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setattr(run_figures, "make_figures", _stub_figures)
    try:
        ref = tmp_path_factory.mktemp("ref") / "ref"
        log = _writes(mp, None)
        main(["run", *ARGS, "--out", str(ref)])
    finally:
        mp.undo()
    return ref, list(log)


def test_write_order(reference):
    ref, log = reference
    assert log[:3] == [rundir.MARKER, rundir.CONFIG, rundir.ENV]
    ck = [i for i, name in enumerate(log) if name == rundir.CHECKPOINT]
    assert len(ck) == 4  # the periodic ones (steps 20, 40, 60), then the end (60)
    for i in ck:  # the write right before every checkpoint is metrics.csv
        assert log[i - 1] == rundir.METRICS, log
    assert log.index(rundir.SUMMARY) > ck[-1]  # the summary after the final numbers
    assert log[-1] == rundir.SUMMARY and "stub.png" in log


def test_a_stop_between_any_two_writes_resumes_bit_identically(reference, tmp_path, monkeypatch):
    ref, log = reference
    monkeypatch.setattr(run_figures, "make_figures", _stub_figures)
    ref_ck = rundir.load_checkpoint(ref / rundir.CHECKPOINT)
    for k in range(len(log)):
        run_dir = tmp_path / f"crash{k}"
        with monkeypatch.context() as mp:
            _writes(mp, k)
            with pytest.raises(Crash):
                main(["run", *ARGS, "--out", str(run_dir)])
        if not run_dir.exists() or not any(p.name != ".lock" for p in run_dir.iterdir()):
            assert k == 0  # only a stop before the first write leaves nothing
            continue
        _consistent(run_dir)
        if not (run_dir / rundir.CONFIG).exists():  # stopped after the marker: start again
            main(["run", *ARGS, "--out", str(run_dir), "--overwrite"])
        else:
            main(["run", "--resume", str(run_dir), "--quiet"])
        summary = json.loads((run_dir / rundir.SUMMARY).read_text())
        assert summary["status"] == "completed", (k, summary)
        ck = rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)
        for key in ("a", "w", "key_data"):
            assert ck[key].tobytes() == ref_ck[key].tobytes(), (k, log[k], key)
        assert _metrics_text(run_dir) == _metrics_text(ref), (k, log[k])
        cfg = cfgmod.validate(rundir.read_config(run_dir / rundir.CONFIG))
        assert cfg == cfgmod.validate(rundir.read_config(ref / rundir.CONFIG))


def test_reversed_write_order_is_caught(reference, tmp_path, monkeypatch):
    """The guard itself: a runner that writes the checkpoint before metrics.csv leaves, at the
    stop between the two, a checkpoint that metrics.csv does not reach; the check above and a
    resume both refuse it."""
    from mfld.app import runner
    from mfld.app.records import merge_metrics

    ref, log = reference
    monkeypatch.setattr(run_figures, "make_figures", _stub_figures)

    def reversed_checkpoint(self, s, row):
        from mfld import loop

        rows = loop.History({k: list(v) for k, v in self.hist.columns.items()})
        rows.append(row)
        runner._checkpoint(self.out_dir, s)  # the wrong order
        rundir.write_metrics(self.out_dir / rundir.METRICS, merge_metrics(self.prior, rows.columns))

    monkeypatch.setattr(runner._RecordHook, "_checkpoint", reversed_checkpoint)
    first = log.index(rundir.METRICS)
    second = log.index(rundir.METRICS, first + 1)
    for k in (first + 1, second + 1):  # reversed: right after a checkpoint, before its metrics
        run_dir = tmp_path / f"rev{k}"
        with monkeypatch.context() as mp:
            _writes(mp, k)
            with pytest.raises(Crash):
                main(["run", *ARGS, "--out", str(run_dir)])
        with pytest.raises(AssertionError, match="metrics.csv"):
            _consistent(run_dir)
        with pytest.raises(SystemExit) as info:
            main(["run", "--resume", str(run_dir), "--quiet"])
        assert info.value.code == 2


def test_resume_removes_the_temporary_files_of_an_interrupted_write(reference, tmp_path, monkeypatch):
    import shutil

    monkeypatch.setattr(run_figures, "make_figures", _stub_figures)
    ref, _ = reference
    run_dir = tmp_path / "r"
    shutil.copytree(ref, run_dir)
    leftovers = [run_dir / ".checkpoint.npz.a1b2c3d4.tmp", run_dir / ".metrics.csv.zz_9yy8x.tmp",
                 run_dir / "figures" / ".stub.png.abcdefgh.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    keep = run_dir / ".notes.tmp"  # not one of ours (no 8-character random part): left alone
    keep.write_text("mine")
    main(["run", "--resume", str(run_dir), "--set", "dynamics.steps=80", "--quiet"])
    assert not any(p.exists() for p in leftovers) and keep.exists()
    notes = json.loads((run_dir / rundir.SUMMARY).read_text())["notes"]
    assert any("removed 3 temporary file(s)" in n for n in notes), notes
    assert int(rundir.load_checkpoint(run_dir / rundir.CHECKPOINT)["step"]) == 80
    assert np.all(np.isfinite(rundir.read_metrics(run_dir / rundir.METRICS)["risk"]))
