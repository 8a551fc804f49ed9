"""Shared helpers of the experiments: output files, power-law fits, figure style.

Every experiment writes into its directory: ``report.md`` (Markdown, readable alone),
``*.csv`` (the numbers of every table and curve) and ``*.png`` figures, and returns a
``summary`` dict (also written as ``summary.json``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path

import numpy as np

from mfld.app import plots as _plots
from mfld.app.rundir import atomic_write_text
from mfld.serialize import jsonable


def out_path(out_dir) -> Path:
    p = Path(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


def run_stages(compute, plot, report, out_dir, quick: bool) -> dict:
    """An experiment's ``run``: ``compute(quick)``, ``plot(res, out)``, then ``report(res, out,
    wall=...)`` with the wall time of all three; a dict that ``plot`` returns is passed on to
    ``report`` as keywords (what a figure says that the report repeats). Returns the summary."""
    out = out_path(out_dir)
    t_wall = time.perf_counter()
    res = compute(quick)
    shown = plot(res, out) or {}
    return report(res, out, wall=time.perf_counter() - t_wall, **shown)


def write_csv(path, columns: dict) -> Path:
    """Columns of equal length (dict name -> sequence), written atomically
    (:func:`mfld.app.rundir.atomic_write_text`)."""
    names = list(columns)
    n = len(next(iter(columns.values()))) if columns else 0
    buf = io.StringIO()
    wr = csv.writer(buf)
    wr.writerow(names)
    for i in range(n):
        wr.writerow([_fmt(columns[k][i]) for k in names])
    atomic_write_text(path, buf.getvalue())
    return Path(path)


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def write_json(path, obj) -> Path:
    """``obj`` as JSON (non-finite floats as strings), written atomically."""
    atomic_write_text(path, json.dumps(jsonable(obj, nonfinite_as_str=True), indent=2, sort_keys=True))
    return Path(path)


def md_table(columns: dict, fmt: str = "{:.4g}") -> str:
    names = list(columns)
    n = len(next(iter(columns.values())))
    lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
    for i in range(n):
        cells = []
        for k in names:
            v = columns[k][i]
            cells.append(fmt.format(v) if isinstance(v, (float, np.floating)) else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(path, title: str, sections: list[tuple[str, str]]) -> Path:
    """A Markdown report: ``# title`` and one ``## head`` section per (head, body), atomically."""
    text = [f"# {title}", ""]
    for head, body in sections:
        text += [f"## {head}", "", body.strip(), ""]
    atomic_write_text(path, "\n".join(text))
    return Path(path)


def finish(out: Path, name: str, title: str, sections: list[tuple[str, str]], *, quick: bool, wall: float,
           files: list[str], **results) -> dict:
    """Write ``report.md`` (the ``sections`` then a "Files" section) and ``summary.json``
    ({name, quick, wall_s} plus ``results``); return the summary. Figure names in ``files``
    take the suffix of the current figure format (:func:`mfld.app.style.figure_format`)."""
    from mfld.app import style

    files = [style.figure_name(f) if f.endswith(".png") else f for f in files]
    write_report(out / "report.md", title, [*sections, ("Files", ", ".join(files))])
    summary = {"name": name, "quick": quick, "wall_s": wall, **results}
    write_json(out / "summary.json", summary)
    return summary


# ---- tables built row by row ------------------------------------------------------------


def append_row(table: dict, **values) -> None:
    """Append one value to each named column of ``table`` (dict name -> list)."""
    for k, v in values.items():
        table[k].append(v)


def append_rows(table: dict, **columns) -> None:
    """Append rows to ``table``: a sequence gives one value per row (all of equal length), a
    scalar (or a string) is repeated on every row."""
    seqs = {k: v for k, v in columns.items() if not isinstance(v, (str, bytes)) and np.ndim(v) > 0}
    lengths = {len(v) for v in seqs.values()}
    if len(lengths) != 1:
        raise ValueError(f"append_rows needs sequences of one length, got {sorted(lengths)}")
    (n,) = lengths
    for i in range(n):
        for k, v in columns.items():
            table[k].append(v[i] if k in seqs else v)


def log_certificate(table: dict, problem, a, w, *, F_star: float | None = None, **values) -> dict:
    """Certify the particles (:func:`mfld.duality.certify`) and append one row to ``table``:
    ``values``, plus those of ``dual_lower``, ``primal_upper`` and ``Fstar_minus_D`` (= F_star
    - dual_lower, with ``F_star``) that are columns of the table. Returns the certificate."""
    from mfld import duality

    c = duality.certify(problem, a, w)
    cert = {"dual_lower": c["dual_lower"], "primal_upper": c["primal_upper"]}
    if F_star is not None:
        cert["Fstar_minus_D"] = F_star - c["dual_lower"]
    append_row(table, **values, **{k: v for k, v in cert.items() if k in table})
    return c


def certify_callback(table: dict, problem, *, F_star: float | None = None, keep=None):
    """A :func:`mfld.loop.simulate` callback that, at each record ``row`` for which
    ``keep(row)`` (default: every record), appends ``t``, ``risk`` (from the row) and the
    certificate (:func:`log_certificate`) to ``table``; it never stops the run."""

    def cb(state, row):
        if keep is None or keep(row):
            log_certificate(table, problem, state.a, state.w, F_star=F_star, t=row["t"], risk=row["risk"])
        return False

    return cb


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend (:func:`mfld.app.plots.pyplot`)."""
    return _plots.pyplot()


def caption(fig, **setting) -> str:
    """Caption ``fig`` with the experiment's setting (:func:`mfld.app.style.setting`: activation,
    loss, lam, tau, N, eta, ...); returns the text."""
    from mfld.app import style

    text = style.setting(**setting)
    style.caption(fig, text)
    return text


# ---- progress ------------------------------------------------------------------------------

_progress_on = True


def set_progress(enabled: bool) -> bool:
    """Turn the experiments' progress bars on or off; returns the previous setting."""
    global _progress_on
    prev, _progress_on = _progress_on, bool(enabled)
    return prev


def _is_tty() -> bool:
    import sys

    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def stages(iterable, desc: str, total: int | None = None):
    """Iterate ``iterable`` with a tqdm progress bar on stderr named ``desc`` (one tick per
    stage: a setting, a member, an initialisation). Silent when progress is off
    (:func:`set_progress`, ``mfld experiment --quiet``) or stderr is not a terminal."""
    from tqdm.auto import tqdm

    items = list(iterable)
    if not _progress_on or not _is_tty():
        yield from items
        return
    bar = tqdm(items, desc=desc, total=total if total is not None else len(items), leave=False, unit="stage",
               dynamic_ncols=True)
    try:
        for item in bar:
            bar.set_postfix_str(str(item if not isinstance(item, tuple) else item[0])[:40])
            yield item
    finally:
        bar.close()


def no_minor_labels(ax):
    """Drop the minor tick labels of log axes (matplotlib writes 2x10^0, 3x10^0, ... which overlap)."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def ticks_at(ax, values, axis: str = "x") -> None:
    """Ticks of a log axis at the values actually run (widths, step sizes), in plain numbers, and
    no minor labels: matplotlib's default minor labels (3x10^1, 4x10^1, ...) overlap."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    a = ax.xaxis if axis == "x" else ax.yaxis
    a.set_major_locator(FixedLocator([float(v) for v in values]))
    a.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    a.set_minor_locator(NullLocator())


def savefig(fig, path) -> Path:
    """Tight layout, 110 dpi, written atomically and closed (:func:`mfld.app.plots.save_figure`)."""
    return _plots.save_figure(fig, path, dpi=110, tight_layout=True, bbox_inches=None)


def fit_power(h, err, confidence: float = 0.95) -> dict:
    """Least-squares slope of log(err) against log(h) with a t-based CI (positive err only)."""
    from scipy import stats

    h = np.asarray(h, dtype=np.float64)
    e = np.asarray(err, dtype=np.float64)
    ok = np.isfinite(e) & (e > 0) & (h > 0)
    lx, ly = np.log(h[ok]), np.log(e[ok])
    k = lx.size
    if k < 3:
        return {"slope": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n_points": k}
    xm = lx.mean()
    sxx = float(np.sum((lx - xm) ** 2))
    slope = float(np.sum((lx - xm) * (ly - ly.mean())) / sxx)
    icpt = float(ly.mean() - slope * xm)
    dof = k - 2
    s2 = float(np.sum((ly - icpt - slope * lx) ** 2) / dof) if dof else 0.0
    se = math.sqrt(s2 / sxx)
    q = float(stats.t.ppf(0.5 + confidence / 2, dof)) if dof else math.inf
    return {"slope": slope, "ci_low": slope - q * se, "ci_high": slope + q * se, "stderr": se,
            "intercept": icpt, "n_points": k}
