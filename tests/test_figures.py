"""Figures a reader can use: visible neuron clouds (checked on the rendered pixels), bounded
drawing of huge clouds, rho* visible in the GIF, legends computed from the data shown,
captions with the setting, one style, --format, progress bars, and the Python/CLI defaults."""

from __future__ import annotations

import inspect

import numpy as np
import pytest

from mfld.app import plots, style

# ---- helpers --------------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch):
    """Keep every figure written through plots.save_figure open (rendered) for inspection."""
    figs = {}
    real = plots.save_figure

    def spy(fig, path, **kw):
        kw["close"] = False
        out = real(fig, path, **kw)
        figs[out.name] = fig
        return out

    monkeypatch.setattr(plots, "save_figure", spy)
    yield figs
    plt = plots.pyplot()
    for f in figs.values():
        plt.close(f)


def rendered(fig):
    """(RGBA float array of the drawn figure, renderer)."""
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba(), dtype=float) / 255.0, fig.canvas.get_renderer()


def axes_pixels(fig, ax, inset: int = 4):
    """The rendered pixels strictly inside ``ax`` (RGB), a few pixels in from its frame."""
    arr, _ = rendered(fig)
    bb = ax.get_window_extent()
    h = arr.shape[0]
    x0, x1 = int(bb.x0) + inset, int(bb.x1) - inset
    y0, y1 = h - int(bb.y1) + inset, h - int(bb.y0) - inset  # display y is from the bottom
    return arr[y0:y1, x0:x1, :3]


def darkness(rgb):
    """1 - luminance (Rec. 709) of RGB pixels on a white page: 0 white, 1 black."""
    return 1.0 - (0.2126 * rgb[..., 0] + 0.7152 * rgb[..., 1] + 0.0722 * rgb[..., 2])


# ---- Python and CLI defaults ------------------------------------------------------------------


def test_python_defaults_equal_the_cli_defaults():
    from mfld.config import ObjectiveConfig
    from mfld.problem import Problem

    sig = inspect.signature(Problem.create).parameters
    assert sig["tau"].default == ObjectiveConfig().tau == 0.05
    assert sig["lam"].default == ObjectiveConfig().lam


# ---- the neuron cloud ---------------------------------------------------------------------------


def _cloud(n, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal(n), rng.standard_normal((n, 2))


def test_neurons_png_is_visible_on_the_rendered_array(tmp_path, captured):
    # N = 4000 (the default run), input weight + bias: the coloured path. A point is "visible"
    # if its pixel is at least 0.3 darker than the white page (gridlines: ~0.1). Today's
    # alpha = 300/N = 0.075 on coolwarm (near-white middle) leaves < 1% of the cloud's pixels
    # that dark; a visible cloud of 4000 points covers a good part of the axes' interior.
    a, w = _cloud(4000)
    info = plots.plot_neurons(a, w, tmp_path / "neurons.png", bias=True)
    fig = captured["neurons.png"]
    ax = fig.axes[0]
    d = darkness(axes_pixels(fig, ax))
    visible = float(np.mean(d > 0.3))
    assert visible > 0.05, visible  # measured: 0.0 before the fix, 0.16 after
    assert info["drawn"] == info["total"] == 4000


def test_neurons_of_a_huge_cloud_draw_a_bounded_subsample(tmp_path, captured):
    # 3e6 particles: at most style.MAX_POINTS = 2e5 are drawn (a uniform random subsample, said
    # in the title), so time and memory are bounded whatever N
    a, w = _cloud(3_000_000, seed=1)
    info = plots.plot_neurons(a, w, tmp_path / "neurons.png", bias=True)
    fig = captured["neurons.png"]
    offsets = fig.axes[0].collections[0].get_offsets()
    assert info["total"] == 3_000_000 and info["drawn"] == style.MAX_POINTS == len(offsets)
    assert "200000 drawn at random" in fig.axes[0].get_title() and "N = 3000000" in fig.axes[0].get_title()
    # the subsample is uniform: its mean of a is within 5 SE of the full mean
    assert abs(np.mean(offsets[:, 1]) - a.mean()) < 5 / np.sqrt(style.MAX_POINTS)


def test_subsample_is_reproducible_and_without_replacement():
    i1, i2 = style.subsample(10_000, 500), style.subsample(10_000, 500)
    assert np.array_equal(i1, i2) and len(np.unique(i1)) == 500
    assert style.subsample(500, 500) is None


# ---- rho* in the GIF --------------------------------------------------------------------------


def test_gif_draws_rho_star_above_translucent_particles():
    import jax

    from mfld.app.animate import draw_first_frame
    from mfld.problem import Problem

    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (12, 1))
    with jax.enable_x64(True):
        pb = Problem.create(x, np.tanh(x[:, 0]), lam=0.5, tau=0.2, bias=False)
    n = 2000
    s = np.sqrt(0.2 / 0.5)
    snaps = [(0, s * rng.standard_normal(n), s * rng.standard_normal((n, 1)))]
    fig, ax, sc, lines = draw_first_frame(snaps, pb, (-3.0, 3.0), (-3.0, 3.0))
    try:
        assert lines is not None
        # rho* is drawn above the particles, and the particles let what is behind show through
        assert lines.get_zorder() > sc.get_zorder()
        assert sc.get_alpha() <= 0.5
        # on the rendered frame the contour colour (navy) is there, inside the particle cloud
        rgb = axes_pixels(fig, ax)
        navy = (rgb[..., 2] > 0.35) & (rgb[..., 0] < 0.2) & (rgb[..., 1] < 0.2)
        hh, ww = navy.shape
        assert navy[hh // 4: 3 * hh // 4, ww // 4: 3 * ww // 4].sum() > 50
    finally:
        plots.pyplot().close(fig)


# ---- the gap figure's legend ------------------------------------------------------------------


def test_gap_legend_is_computed_from_the_data_shown(tmp_path, captured):
    from mfld.app.certificate_plots import plot_gap

    # the gap falls like exp(-2 t) to t = 4, then rises 10x (a floor that goes astray)
    t = np.linspace(0, 10, 101)
    gap = np.where(t <= 4, np.exp(-2 * t), np.exp(-8) * 10 ** ((t - 4) / 6))
    rate = plot_gap({"t": t, "dual_lower": -gap / 2, "primal_upper": gap / 2}, tmp_path / "gap.png",
                    setting="tanh, λ = 0.1, τ = 0.05, N = 4000, η = 0.02")
    fig = captured["gap.png"]
    texts = [tx.get_text() for tx in fig.axes[0].get_legend().get_texts()]
    assert rate == pytest.approx(2.0, rel=1e-3)
    fit = next(s for s in texts if s.startswith("fit on t∈["))
    t_end = float(fit.split("[")[1].split(",")[1].split("]")[0])
    assert t_end <= 4.0 + 1e-9  # the fitted window stops at the minimum
    assert any("×10 above" in s for s in texts), texts  # the rise after the minimum is named
    span = next(s for s in texts if s.startswith("t > "))
    assert "not fitted" in span and f"{np.exp(-8) * 10:.2g}" in span  # the range of what follows the fit
    assert "λ = 0.1" in fig._suptitle.get_text()


def test_gap_legend_without_a_rise_says_nothing_of_one(tmp_path, captured):
    from mfld.app.certificate_plots import plot_gap

    t = np.linspace(0, 5, 60)
    plot_gap({"t": t, "dual_lower": -np.exp(-t), "primal_upper": np.exp(-t)}, tmp_path / "gap.png")
    texts = [tx.get_text() for tx in captured["gap.png"].axes[0].get_legend().get_texts()]
    assert not any("above it" in s for s in texts)


# ---- style, captions, formats -------------------------------------------------------------------


def test_setting_caption_and_style():
    assert style.setting(activation="tanh", loss="squared", lam=0.1, tau=0.05, N=4000, eta=0.02) == \
        "tanh, squared loss, λ = 0.1, τ = 0.05, N = 4000, η = 0.02"
    plots.pyplot()
    import matplotlib

    assert matplotlib.rcParams["image.cmap"] == style.CMAP and matplotlib.rcParams["pdf.fonttype"] == 42


@pytest.mark.parametrize("fmt, magic", [("pdf", b"%PDF"), ("svg", b"<?xml"), ("png", b"\x89PNG")])
def test_figure_format_writes_that_format(tmp_path, fmt, magic):
    t = np.linspace(0, 1, 5)
    with style.figure_format(fmt):
        out = plots.plot_risk({"t": t, "risk": np.exp(-t)}, tmp_path / "risk.png")
    assert out.suffix == "." + fmt and out.read_bytes().startswith(magic)
    from mfld.errors import ConfigError

    with pytest.raises(ConfigError, match="png, pdf, svg"), style.figure_format("jpg"):
        pass


def test_run_figures_carry_the_setting_and_honour_format(tmp_path, capsys):
    from mfld.cli import main

    out = tmp_path / "r"
    main(["run", "--set", "model.n_particles=64", "--set", "dynamics.steps=20", "--set", "record.every=10",
          "--set", "record.certify_every=0", "--set", "record.optimum=false", "--out", str(out), "--quiet",
          "--format", "svg"])
    figs = sorted(p.name for p in (out / "figures").iterdir())
    assert figs == ["function.svg", "neurons.svg", "risk.svg"], figs
    svg = (out / "figures" / "risk.svg").read_text()
    # the caption names activation, lam, tau, N and eta (svg.fonttype none keeps text as text)
    for part in ("tanh", "λ = 0.1", "τ = 0.05", "N = 64", "η = 0.02"):
        assert part in svg, part
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["plot", str(out), "--format", "jpg"])
    assert e.value.code == 2 and capsys.readouterr().err.count("\n") == 1


# ---- progress ---------------------------------------------------------------------------------


def test_experiment_progress_is_shown_on_a_terminal_only(monkeypatch, capsys):
    from mfld.experiments import _common as C

    monkeypatch.setattr(C, "_is_tty", lambda: True)
    assert list(C.stages(range(3), "stage-name")) == [0, 1, 2]
    assert "stage-name" in capsys.readouterr().err
    prev = C.set_progress(False)  # --quiet
    try:
        assert list(C.stages(range(3), "stage-name")) == [0, 1, 2]
        assert capsys.readouterr().err == ""
    finally:
        C.set_progress(prev)
    monkeypatch.setattr(C, "_is_tty", lambda: False)  # not a terminal (CI, a pipe)
    assert list(C.stages(range(3), "stage-name")) == [0, 1, 2]
    assert capsys.readouterr().err == ""


def test_every_experiment_reports_its_stages():
    from pathlib import Path

    from mfld.experiments import EXPERIMENTS

    for name, mod in EXPERIMENTS.items():
        src = Path(__file__).resolve().parents[1].joinpath(*mod.split(".")).with_suffix(".py").read_text()
        assert "C.stages(" in src, name
