"""A run's records: how it ended (:class:`RunStatus`), its metrics rows (merged across a
resume, checked finite) and the content of its ``summary.json``.

Shared by ``mfld run`` (:mod:`mfld.app.runner`) and ``mfld sweep`` (:mod:`mfld.app.sweep_cmd`),
whose members are written as runs. Plain Python; no JAX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The columns of a record row that must be finite (else the run diverged).
FINITE_COLUMNS = ("risk", "reg_risk", "grad_norm")


@dataclass
class RunStatus:
    """How a run ended: ``value`` is ``completed``, ``diverged``, ``interrupted`` or ``failed``;
    ``reason`` says why (None when completed); ``diverged_at_step`` (a divergence) and
    ``signal`` (an interruption by a signal) are None otherwise."""

    value: str = "completed"
    reason: str | None = None
    diverged_at_step: int | None = None
    signal: int | None = None


def is_finite_row(row) -> bool:
    """Whether the record row's risk, regularised risk and gradient norm are finite (absent: yes)."""
    return all(math.isfinite(row.get(k, 0.0)) for k in FINITE_COLUMNS)


def merge_metrics(prior, cols) -> dict:
    """The metrics of a resumed run: ``prior`` (the rows kept from metrics.csv, or None) then
    ``cols`` (the new rows), as lists per column; a column missing on one side is NaN there."""
    cols = {k: list(v) for k, v in (cols or {}).items()}
    if not prior:
        return cols
    n_prior = len(prior["step"])
    n_new = len(next(iter(cols.values()), []))
    keys = list(prior) + [k for k in cols if k not in prior]
    return {k: list(prior.get(k, [float("nan")] * n_prior)) + list(cols.get(k, [float("nan")] * n_new))
            for k in keys}


def run_summary(cfg, metrics, status: RunStatus, wall: float, optimum=None) -> dict:
    """The core of ``summary.json``: status, reason, run time, name, steps (with the step a run
    diverged at or the signal that stopped it), the final record, and F* when solved."""
    s = {"status": status.value, "reason": status.reason, "run_time_s": wall, "name": cfg.name,
         "steps": cfg.dynamics.steps}
    if status.diverged_at_step is not None:
        s["diverged_at_step"] = status.diverged_at_step
    if status.signal is not None:
        s["signal"] = status.signal
    if metrics and len(metrics.get("step", [])):
        s["final"] = {k: (int(v[-1]) if k == "step" else float(v[-1])) for k, v in metrics.items()}
    if optimum is not None:
        s["F_star"] = float(optimum.F_star)
        s["F_star_err"] = float(optimum.F_star_err)
        s["F_star_method"] = optimum.method
    return s
