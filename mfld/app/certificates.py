"""A run's optimum F* and optimality certificates: read a stored ``optimum.json`` (checked
against the problem), solve the optimum, and the function that certifies a state at a record.

Shared by ``mfld run`` (:mod:`mfld.app.runner`), ``mfld sweep`` (each member is certified
exactly as a run of its config) and ``mfld plot`` (:mod:`mfld.app.replot`). JAX is imported by
the solvers (:mod:`mfld.optimum`, :mod:`mfld.duality`) only when they are called.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mfld.app import rundir
from mfld.app.inputs import certificates_available

#: The keys an optimum.json must have.
OPTIMUM_KEYS = ("F_star", "F_star_err", "F_star_upper", "u", "f", "method", "mean", "cov")


@dataclass(frozen=True)
class RunCertificates:
    """What :func:`optimum_and_certify` gives a run: ``optimum`` (None when not asked for or not
    applicable), ``certify(state) -> dict`` of certificate columns (None when not recorded), and
    ``solved``: the optimum was solved now (not read from a stored optimum.json), so the run
    writes it."""

    optimum: object = None
    certify: Callable | None = None
    solved: bool = False


def particle_sign_fraction(cfg, problem, state) -> float:
    """The fixed output layer's sign fraction as the particles have it: round(pf N) / N, not
    pf (``model.init.plus_fraction`` for a trained output layer)."""
    if problem.output == "fixed":
        return float(np.mean(np.asarray(state.a) > 0))
    return cfg.model.init.plus_fraction


def optimum_and_certify(cfg, problem, state, notes: list, stored=None) -> RunCertificates:
    """The optimum and the certify function as ``cfg.record`` asks and the theory allows (a
    reason they are not defined is appended to ``notes``, as is a solver's fallback).
    ``stored``: a resumed run's optimum.json (:func:`read_optimum`), kept instead of a second
    solve."""
    rec = cfg.record
    cert_reason = certificates_available(problem) if rec.certify_every or rec.optimum else None
    if cert_reason:
        notes.append(cert_reason)
        return RunCertificates()
    plus_fraction = particle_sign_fraction(cfg, problem, state)
    optimum, solved = None, False
    if rec.optimum:
        if stored is not None:  # a resume keeps the run's F* (no second solve)
            optimum = stored
        else:
            from mfld.optimum import solve_optimum

            optimum, solved = solve_optimum(problem, seed=cfg.seed, plus_fraction=plus_fraction), True
            if "fallback" in optimum.info:
                notes.append(f"optimum: {optimum.info['fallback']}")
    certify = None
    if rec.certify_every:
        from mfld.duality import certify as certify_state

        def certify(s):
            return certify_state(problem, s.a, s.w, method=rec.certify_method, n_samples=rec.certify_samples,
                                 seed=cfg.seed, optimum=optimum, plus_fraction=plus_fraction)
    return RunCertificates(optimum, certify, solved)


def read_optimum(out_dir, problem):
    """The run's optimum.json (None if there is none), checked against the problem: a damaged
    or edited file is a :class:`mfld.app.rundir.RunFileError` naming the key."""
    path = Path(out_dir) / rundir.OPTIMUM
    if not path.exists():
        return None
    d = rundir.read_json(path, required=OPTIMUM_KEYS)
    _check_optimum_numbers(path, d, int(problem.n))
    _check_optimum_shapes(path, d)
    from mfld.optimum import Optimum

    try:
        return Optimum.from_json(json.dumps(d), problem=problem)
    except Exception as err:  # noqa: BLE001 - whatever else is wrong with it: one line
        raise rundir.RunFileError(path, f"not usable ({type(err).__name__})",
                                  "the optimum.json the run wrote") from None


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_optimum_numbers(path, d: dict, n: int) -> None:
    """F*, its error and upper bound finite numbers; ``u`` and ``f`` one finite number per data point."""
    allowed = "the optimum.json the run wrote"
    for k in ("F_star", "F_star_err", "F_star_upper"):
        if not _is_number(d[k]) or not math.isfinite(d[k]):
            raise rundir.RunFileError(path, f"key {k!r} is {d[k]!r:.40}, not a finite number", allowed)
    for k in ("u", "f"):
        if not (isinstance(d[k], list) and len(d[k]) == n and all(_is_number(v) and math.isfinite(v) for v in d[k])):
            raise rundir.RunFileError(path, f"key {k!r} is not a list of {n} finite numbers (one per data point)",
                                      allowed)
    if d["method"] not in ("closed_form", "quadrature", "mc"):
        raise rundir.RunFileError(path, f"key 'method' is {d['method']!r:.40}", "closed_form, quadrature or mc")


def _check_optimum_shapes(path, d: dict) -> None:
    """``mean`` a vector and ``cov`` a matching finite square matrix; ``plus_fraction`` in [0, 1];
    ``info`` an object."""
    allowed = "the optimum.json the run wrote"
    try:
        mean = np.asarray(d["mean"], dtype=np.float64)
        cov = np.asarray(d["cov"], dtype=np.float64)
        ok = mean.ndim == 1 and cov.shape == (mean.size, mean.size) and np.all(np.isfinite(cov))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise rundir.RunFileError(path, "keys 'mean' and 'cov' are not a vector and a matching square matrix",
                                  allowed)
    pf = d.get("plus_fraction", 0.5)
    if not _is_number(pf) or not 0 <= pf <= 1:
        raise rundir.RunFileError(path, f"key 'plus_fraction' is {pf!r:.40}", "a number in [0, 1]")
    if not isinstance(d.get("info", {}), dict):
        raise rundir.RunFileError(path, "key 'info' is not an object", allowed)
