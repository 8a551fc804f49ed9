"""One figure style for every figure mfld draws (runs, certificates, sweeps, experiments, GIFs).

- :data:`RC`: the matplotlib settings (sizes, fonts, grid, colour cycle), applied once by
  :func:`apply` (called by :func:`mfld.app.plots.pyplot`).
- :data:`CMAP`: the sequential colormap for a third variable (perceptually uniform, dark at both
  ends of the figure's white background: no point vanishes into the page, unlike a diverging map
  whose middle is white).
- :func:`setting` formats the parameters of a run (activation, lam, tau, N, eta) as the caption
  every figure carries, so a figure copied into a paper still says what produced it.
- :func:`figure_format` chooses the file format of every figure written inside it (``png``,
  ``pdf`` or ``svg``; ``mfld run/plot/experiment --format``); :func:`figure_name` gives a file
  name the current format's suffix.
- :data:`MAX_POINTS`: scatter plots of particle clouds draw at most this many points (a uniform
  random subsample, said so in the title): 2e5 points keep a figure legible and its drawing
  bounded in time and memory for any N.
"""

from __future__ import annotations

import contextlib
import contextvars
from pathlib import Path

FORMATS = ("png", "pdf", "svg")
MAX_POINTS = 200_000
CMAP = "viridis"
DPI = 120

RC = {
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "figure.titlesize": 9.5,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.framealpha": 0.85,
    "image.cmap": CMAP,
    "svg.fonttype": "none",  # text stays text in SVG
    "pdf.fonttype": 42,      # TrueType in PDF (editable, journal-friendly)
}

_format: contextvars.ContextVar[str] = contextvars.ContextVar("mfld_figure_format", default="png")
_applied = False


def apply() -> None:
    """Set :data:`RC` in matplotlib's rcParams (once per process)."""
    global _applied
    if _applied:
        return
    import matplotlib

    matplotlib.rcParams.update(RC)
    _applied = True


def current_format() -> str:
    """The file format figures are written in now (``png`` unless :func:`figure_format` says)."""
    return _format.get()


@contextlib.contextmanager
def figure_format(fmt: str | None):
    """Write every figure inside the block as ``fmt`` (png, pdf, svg; None: leave as is)."""
    if fmt is None:
        yield
        return
    from mfld.errors import ConfigError

    fmt = str(fmt).lower().lstrip(".")
    if fmt not in FORMATS:
        raise ConfigError("unknown figure format", field="--format", value=fmt, allowed=", ".join(FORMATS))
    token = _format.set(fmt)
    try:
        yield
    finally:
        _format.reset(token)


def figure_name(name: str) -> str:
    """``name`` with the suffix of the current figure format (``risk.png`` -> ``risk.pdf``)."""
    p = Path(name)
    if p.suffix.lower() in {".gif"}:
        return name
    return str(p.with_suffix("." + current_format()))


def _num(v) -> str:
    v = float(v)
    return f"{v:g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.2g}"


def setting(*, activation=None, loss=None, lam=None, tau=None, N=None, eta=None, steps=None, extra=None) -> str:
    """The caption of a figure: ``tanh, squared loss, λ = 0.1, τ = 0.05, N = 4000, η = 0.02``
    (fields left None are omitted; ``N`` may be a string such as ``"32-512"``)."""
    parts = []
    if activation is not None:
        parts.append(str(activation))
    if loss is not None:
        parts.append(f"{loss} loss")
    if lam is not None:
        parts.append(f"λ = {_num(lam)}")
    if tau is not None:
        parts.append(f"τ = {_num(tau)}")
    if N is not None:
        parts.append(f"N = {N}" if isinstance(N, str) else f"N = {int(N)}")
    if eta is not None:
        parts.append(f"η = {_num(eta)}")
    if steps is not None:
        parts.append(f"{int(steps)} steps")
    if extra:
        parts.append(str(extra))
    return ", ".join(parts)


def caption(fig, text: str) -> None:
    """Put the setting ``text`` as the figure's suptitle (one style for every figure)."""
    fig.suptitle(text, fontsize=RC["figure.titlesize"], color="0.25")


def subsample(n: int, max_points: int = MAX_POINTS, seed: int = 0):
    """Indices of at most ``max_points`` of ``n`` points (sorted, uniform without replacement,
    reproducible), or None when all ``n`` are drawn."""
    if n <= max_points:
        return None
    import numpy as np

    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def point_alpha(n_drawn: int) -> float:
    """Marker opacity for a cloud of ``n_drawn`` points: opaque for a few hundred, never below
    0.25 (a single point stays visible on white; overlaps still show density)."""
    return float(min(0.9, max(0.25, (2000.0 / max(n_drawn, 1)) ** 0.5)))
