"""Shared helpers of the experiments: output files, power-law fits, figure style.

Every experiment writes into its directory: ``report.md`` (Markdown, readable alone),
``*.csv`` (the numbers of every table and curve) and ``*.png`` figures, and returns a
``summary`` dict (also written as ``summary.json``).
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import numpy as np


def out_path(out_dir) -> Path:
    p = Path(out_dir)
    p.mkdir(parents=True, exist_ok=True)
    return p


def write_csv(path, columns: dict) -> Path:
    """Columns of equal length (dict name -> sequence), written atomically."""
    names = list(columns)
    n = len(next(iter(columns.values()))) if columns else 0
    tmp = Path(str(path) + ".tmp")
    with open(tmp, "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow(names)
        for i in range(n):
            wr.writerow([_fmt(columns[k][i]) for k in names])
    os.replace(tmp, path)
    return Path(path)


def _fmt(v):
    if isinstance(v, (float, np.floating)):
        return repr(float(v))
    return v


def write_json(path, obj) -> Path:
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(_jsonable(obj), indent=2, sort_keys=True))
    os.replace(tmp, path)
    return Path(path)


def _jsonable(o):
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, np.ndarray):
        return _jsonable(o.tolist())
    if isinstance(o, (np.floating, float)):
        f = float(o)
        return f if math.isfinite(f) else str(f)
    if isinstance(o, (np.integer,)):
        return int(o)
    return o


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
    text = [f"# {title}", ""]
    for head, body in sections:
        text += [f"## {head}", "", body.strip(), ""]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("\n".join(text))
    os.replace(tmp, path)
    return Path(path)


def pyplot():
    """matplotlib.pyplot with the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def no_minor_labels(ax):
    """Drop the minor tick labels of log axes (matplotlib writes 2x10^0, 3x10^0, ... which overlap)."""
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def savefig(fig, path) -> Path:
    fig.tight_layout()
    tmp = str(path) + ".tmp.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    pyplot().close(fig)
    return Path(path)


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
