"""Grid references for d = 1 without bias: theta = (a, w) in R^2 (THEORY sections 4, 6, 7).

Everything here is deterministic quadrature in float64 NumPy/SciPy (the losses' and
activations' float64 NumPy forms, ``Loss.np_*`` and ``Activation.np_fn``), independent of the
particle code paths, so it serves as a reference for them:

- :class:`Grid`: a uniform cell-centred grid on [-a_max, a_max] x [-w_max, w_max]; a density
  is an array ``rho (n_a, n_w)`` of cell values with ``sum(rho) * h_a * h_w = 1``.
- :func:`predict`, :func:`free_energy`, :func:`gibbs` (rho_hat and log Z by quadrature),
  :func:`dual` (D(u) of THEORY 6), :func:`fixed_point` (rho* by the damped fixed-point
  iteration, halving beta whenever the residual grows; THEORY 6).
- :func:`fokker_planck`: a finite-volume solver of the mean-field Fokker-Planck equation
  d rho/dt = div(rho grad V_rho) + tau Lap rho with Scharfetter-Gummel (exponential
  fitting) fluxes and zero-flux boundaries: mass is conserved to rounding and the discrete
  Gibbs density exp(-V/tau) is an exact stationary state (so the solver's limit is the grid
  fixed point). Time stepping: Crank-Nicolson with V_rho extrapolated to the half step
  (second order), falling back to implicit Euler on a step whose size would break positivity.
- :func:`poincare_constant`: the Poincare constant of rho_hat_u on the grid, the smallest
  nonzero eigenvalue of minus the (symmetrised) Scharfetter-Gummel generator of the Langevin
  dynamics leaving rho_hat invariant, divided by tau (THEORY 7 normalisation:
  Var(h) <= (1/C_P) E|grad h|^2). It upper-bounds the LSI constant.

Model (output layer ``trained``: psi(a) = a; ``bounded``: psi(a) = r_out tanh(a)):
  f(x) = E_rho[psi(a) sigma(w x)],  g_u(w) = (1/n) sum_j u_j sigma(w x_j),
  V_u(a, w) = psi(a) g_u(w) + (lam/2)(a^2 + w^2).
Discretisation errors: O(h^2) quadrature, O(h^2) for the SG generator's spectrum, plus the
truncation of the domain (choose a_max, w_max so that the densities are negligible there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
from scipy.special import logsumexp

from mfld.errors import ConfigError, TheoryNotApplicable
from mfld.losses import get_loss

__all__ = [
    "Grid",
    "make_grid",
    "gaussian_density",
    "predict",
    "residual",
    "potential",
    "gibbs",
    "free_energy",
    "dual",
    "expect",
    "fixed_point",
    "GridOptimum",
    "fokker_planck",
    "FPResult",
    "generator",
    "poincare_constant",
]


# ---- the grid ------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Grid:
    """Cell centres ``a (n_a,)``, ``w (n_w,)``, spacings, data and the precomputed
    ``S = sigma(w x^T) (n_w, n)`` and ``psi = psi(a) (n_a,)``."""

    a: np.ndarray
    w: np.ndarray
    ha: float
    hw: float
    x: np.ndarray
    y: np.ndarray
    S: np.ndarray
    psi: np.ndarray
    lam: float
    tau: float
    loss: str
    output: str
    activation: str
    quad: np.ndarray = field(repr=False)  # (n_a, n_w) lam/2 (a^2 + w^2)

    @property
    def shape(self):
        return (self.a.size, self.w.size)

    @property
    def cell(self) -> float:
        return self.ha * self.hw

    @property
    def n(self) -> int:
        return self.x.size


def make_grid(problem, n_a: int = 81, n_w: int = 81, *, a_max: float | None = None,
              w_max: float | None = None) -> Grid:
    """A grid for a d = 1, no-bias, mean-field problem with tau > 0.

    Default extents: w_max = 7 sqrt(tau/lam) (the w-marginal of any rho_hat is a bounded
    perturbation of N(0, tau/lam) for a bounded sigma); a_max = w_max + sup|sigma| |u|_inf / lam
    with |u|_inf bounded by max|y| (squared loss, from f = 0) or 1 (logistic) -- pass explicit
    extents for unbounded activations or large signals.
    """
    if problem.p != 1 or problem.bias:
        raise ConfigError("the grid reference needs d = 1 without bias (theta in R^2)",
                          field="data.params.d, model.bias", value=(problem.d, problem.bias),
                          allowed="d = 1, bias = false")
    if problem.output not in ("trained", "bounded"):
        raise ConfigError("the grid reference covers a trained or bounded output layer",
                          field="model.output", value=problem.output, allowed="trained, bounded")
    if problem.scaling != "mean_field":
        raise TheoryNotApplicable("the grid reference is a mean-field object (no measure under NTK)")
    tau, lam = float(problem.tau), float(problem.lam)
    if not tau > 0:
        raise TheoryNotApplicable("tau = 0: no Gibbs measure / Fokker-Planck diffusion on the grid")
    for v, name in ((n_a, "n_a"), (n_w, "n_w")):
        if int(v) != v or v < 8:
            raise ConfigError("grid size must be an integer >= 8", field=name, value=v)
    s = math.sqrt(tau / lam)
    if w_max is None:
        w_max = 7.0 * s
    if a_max is None:
        sup = problem.activation.sup
        if sup is None:
            raise ConfigError("give a_max for an unbounded activation", field="a_max")
        umax = 1.0 if problem.loss.name == "logistic" else float(np.max(np.abs(np.asarray(problem.y))))
        a_max = 7.0 * s + sup * umax / lam
    a = -a_max + (np.arange(n_a) + 0.5) * (2 * a_max / n_a)
    w = -w_max + (np.arange(n_w) + 0.5) * (2 * w_max / n_w)
    x = np.asarray(problem.x, dtype=np.float64)[:, 0]
    y = np.asarray(problem.y, dtype=np.float64)
    S = problem.activation.np_fn(w[:, None] * x[None, :])
    psi = float(problem.r_out) * np.tanh(a) if problem.output == "bounded" else a.copy()
    quad = 0.5 * lam * (a[:, None] ** 2 + w[None, :] ** 2)
    return Grid(a=a, w=w, ha=2 * a_max / n_a, hw=2 * w_max / n_w, x=x, y=y, S=S, psi=psi, lam=lam,
                tau=tau, loss=problem.loss.name, output=problem.output,
                activation=problem.activation.name, quad=quad)


def gaussian_density(grid: Grid, a_scale: float = 1.0, w_scale: float = 1.0) -> np.ndarray:
    """N(0, a_scale^2) x N(0, w_scale^2) at the cell centres, renormalised to mass 1 on the grid."""
    r = np.exp(-0.5 * (grid.a[:, None] / a_scale) ** 2 - 0.5 * (grid.w[None, :] / w_scale) ** 2)
    return r / (r.sum() * grid.cell)


def expect(grid: Grid, rho: np.ndarray, values: np.ndarray) -> float:
    """E_rho[values] by the midpoint rule (``values`` broadcast to the grid shape)."""
    return float(np.sum(rho * values) * grid.cell)


def predict(grid: Grid, rho: np.ndarray) -> np.ndarray:
    """f_rho(x_j) = E_rho[psi(a) sigma(w x_j)] for the training inputs (n,)."""
    return ((grid.psi @ rho) * grid.cell) @ grid.S


def residual(grid: Grid, f: np.ndarray) -> np.ndarray:
    """u_j = l'(f_j, y_j)."""
    return get_loss(grid.loss).np_derivative(f, grid.y)


def potential(grid: Grid, u: np.ndarray) -> np.ndarray:
    """V_u(a, w) = psi(a) g_u(w) + (lam/2)(a^2 + w^2) on the grid (n_a, n_w)."""
    g = grid.S @ u / grid.n
    return grid.psi[:, None] * g[None, :] + grid.quad


def gibbs(grid: Grid, u: np.ndarray):
    """(rho_hat_u, log Z_u): the proximal Gibbs density exp(-V_u/tau)/Z on the grid."""
    e = -potential(grid, u) / grid.tau
    log_z = float(logsumexp(e)) + math.log(grid.cell)
    return np.exp(e - log_z), log_z


def free_energy(grid: Grid, rho: np.ndarray) -> dict:
    """F(rho) = R + (lam/2) E|theta|^2 + tau E[log rho] by quadrature, with its parts."""
    f = predict(grid, rho)
    risk = float(np.mean(get_loss(grid.loss).np_value(f, grid.y)))
    reg = expect(grid, rho, grid.quad)
    with np.errstate(divide="ignore", invalid="ignore"):
        neg_ent = float(np.sum(np.where(rho > 0, rho * np.log(np.where(rho > 0, rho, 1.0)), 0.0)) * grid.cell)
    return {"F": risk + reg + grid.tau * neg_ent, "risk": risk, "reg_risk": risk + reg,
            "neg_entropy": neg_ent, "m2_a": expect(grid, rho, grid.a[:, None] ** 2),
            "m2_w": expect(grid, rho, grid.w[None, :] ** 2)}


def dual(grid: Grid, u: np.ndarray) -> float:
    """D(u) = -(1/n) sum_j l_j*(u_j) - tau log Z(u) (THEORY 6), Z by grid quadrature."""
    _, log_z = gibbs(grid, u)
    return float(-np.mean(get_loss(grid.loss).np_conjugate(u, grid.y)) - grid.tau * log_z)


@dataclass(frozen=True)
class GridOptimum:
    """rho* on the grid: u*, rho*, F* = F(rho*), the dual D(u*), the fixed-point residual
    max_j |u_j - l'(f_{rho_hat_u}(x_j))|, the iteration count and the final damping."""

    u: np.ndarray
    rho: np.ndarray
    F_star: float
    dual: float
    risk: float
    residual: float
    iterations: int
    beta: float


def fixed_point(grid: Grid, u0: np.ndarray | None = None, *, beta: float = 1.0, tol: float = 1e-12,
                max_iter: int = 20000) -> GridOptimum:
    """Damped fixed-point iteration u <- (1 - beta) u + beta l'(f_{rho_hat_u}, y), halving beta
    whenever the residual grows (THEORY 6). Raises RuntimeError if it does not converge."""
    # default start: u at f = 0 (the residual of the zero network)
    u = residual(grid, np.zeros(grid.n)) if u0 is None else np.asarray(u0, dtype=np.float64).copy()

    def tmap(u):
        rho, _ = gibbs(grid, u)
        return residual(grid, predict(grid, rho))

    tu = tmap(u)
    res = float(np.max(np.abs(tu - u)))
    it = 0
    while res > tol and it < max_iter:
        it += 1
        cand = (1 - beta) * u + beta * tu
        tc = tmap(cand)
        rc = float(np.max(np.abs(tc - cand)))
        if rc > res and beta > 1e-6:
            beta *= 0.5
            continue
        u, tu, res = cand, tc, rc
    if res > tol:
        raise RuntimeError(f"grid fixed point did not converge: residual {res:.3g} after {it} "
                           f"iterations (beta {beta:.3g})")
    rho, _ = gibbs(grid, u)
    fe = free_energy(grid, rho)
    return GridOptimum(u=u, rho=rho, F_star=fe["F"], dual=dual(grid, u), risk=fe["risk"], residual=res,
                       iterations=it, beta=beta)


# ---- Scharfetter-Gummel generator -------------------------------------------------------


def _bern(z):
    """B(z) = z / (e^z - 1), B(0) = 1, evaluated stably."""
    z = np.asarray(z, dtype=np.float64)
    small = np.abs(z) < 1e-8
    zs = np.where(small, 1.0, z)
    return np.where(small, 1.0 - 0.5 * z, zs / np.expm1(zs))


def _edges(grid: Grid, V: np.ndarray):
    """Neighbour pairs (i, j) with j the +a or +w neighbour of i, the potential jump
    z = (V_j - V_i)/tau and h^2 along that edge."""
    na, nw = grid.shape
    idx = np.arange(na * nw).reshape(na, nw)
    ia, ja = idx[:-1, :].ravel(), idx[1:, :].ravel()
    iw, jw = idx[:, :-1].ravel(), idx[:, 1:].ravel()
    za = ((V[1:, :] - V[:-1, :]) / grid.tau).ravel()
    zw = ((V[:, 1:] - V[:, :-1]) / grid.tau).ravel()
    i = np.concatenate([ia, iw])
    j = np.concatenate([ja, jw])
    z = np.concatenate([za, zw])
    h2 = np.concatenate([np.full(ia.size, grid.ha**2), np.full(iw.size, grid.hw**2)])
    return i, j, z, h2


def generator(grid: Grid, V: np.ndarray, *, symmetric: bool = False) -> sp.csc_matrix:
    """The SG finite-volume Fokker-Planck matrix Q (d rho/dt = Q rho, columns sum to 0) for
    the potential V; with ``symmetric=True`` its symmetrisation Pi^{-1/2} Q Pi^{1/2} by the
    Gibbs weights Pi = exp(-V/tau) (same spectrum; built from sqrt(r_ij r_ji) =
    (tau/h^2)(z/2)/sinh(z/2), which never under- or overflows)."""
    i, j, z, h2 = _edges(grid, V)
    nn = grid.a.size * grid.w.size
    c = grid.tau / h2
    r_ij = c * _bern(z)   # rate i -> j
    r_ji = c * _bern(-z)  # rate j -> i
    diag = np.zeros(nn)
    np.add.at(diag, i, -r_ij)
    np.add.at(diag, j, -r_ji)
    if symmetric:
        half = 0.5 * z
        small = np.abs(half) < 1e-8
        off = c * np.where(small, 1.0, half / np.sinh(np.where(small, 1.0, half)))
        rows = np.concatenate([j, i, np.arange(nn)])
        cols = np.concatenate([i, j, np.arange(nn)])
        vals = np.concatenate([off, off, diag])
    else:
        rows = np.concatenate([j, i, np.arange(nn)])   # Q[j, i] = r_ij, Q[i, j] = r_ji
        cols = np.concatenate([i, j, np.arange(nn)])
        vals = np.concatenate([r_ij, r_ji, diag])
    return sp.csc_matrix((vals, (rows, cols)), shape=(nn, nn))


def poincare_constant(grid: Grid, u: np.ndarray | None = None, *, rho: np.ndarray | None = None,
                      n_eigs: int = 3) -> float:
    """The Poincare constant of rho_hat_u on the grid (give ``u`` or a density ``rho``, whose
    u = l'(f_rho, y) is used): smallest nonzero eigenvalue of -Q_sym divided by tau."""
    if (u is None) == (rho is None):
        raise ConfigError("give exactly one of u or rho", field="u")
    if u is None:
        u = residual(grid, predict(grid, rho))
    V = potential(grid, np.asarray(u, dtype=np.float64))
    M = -generator(grid, V, symmetric=True)
    shift = -1e-3 * grid.lam
    # a fixed start vector: ARPACK's default one is random, which made the constant differ in
    # its last bits from one process to the next (a generic vector, not ones: an odd
    # eigenfunction is orthogonal to a symmetric start)
    v0 = np.random.default_rng(0).standard_normal(M.shape[0])
    vals = spla.eigsh(M, k=n_eigs, sigma=shift, which="LM", v0=v0, return_eigenvectors=False)
    vals = np.sort(vals)
    scale = grid.tau / min(grid.ha, grid.hw) ** 2
    if abs(vals[0]) > 1e-8 * scale:
        raise RuntimeError(f"generator's smallest eigenvalue {vals[0]:.3g} is not 0")
    return float(vals[1] / grid.tau)


# ---- Fokker-Planck time stepping ---------------------------------------------------------


@dataclass
class FPResult:
    """Records of a Fokker-Planck solve: ``times`` and ``columns`` (dict of arrays: F, risk,
    reg_risk, neg_entropy, m2_a, m2_w, mass, min_rho, plus the user's ``observe``), the final
    density ``rho`` and the number of steps that fell back to implicit Euler."""

    times: np.ndarray
    columns: dict
    rho: np.ndarray
    n_fallback: int
    snapshots: list = field(default_factory=list)


def fokker_planck(grid: Grid, rho0: np.ndarray, t_end: float, dt: float, *, record_every: int = 1,
                  observe=None, keep_snapshots: bool = False) -> FPResult:
    """Solve d rho/dt = div(rho grad V_rho) + tau Lap rho from ``rho0`` up to ``t_end``.

    Crank-Nicolson with V extrapolated to the half step, V_{n+1/2} = 1.5 V_n - 0.5 V_{n-1}
    (the first step uses V_0): second order in dt. The CN right-hand side stays non-negative
    when dt * max|Q_ii| <= 2; a step that violates it is taken by implicit Euler (always
    positivity preserving: I - dt Q is an M-matrix). Mass is conserved to rounding (zero-flux
    boundaries; the columns of Q sum to zero). ``observe(rho) -> dict`` adds columns;
    records are taken every ``record_every`` steps and at the end.
    """
    if not (dt > 0 and t_end >= 0):
        raise ConfigError("need dt > 0 and t_end >= 0", field="dt", value=(dt, t_end))
    rho = np.asarray(rho0, dtype=np.float64).copy()
    n_steps = int(math.ceil(t_end / dt - 1e-12))
    dt = t_end / n_steps if n_steps else dt
    nn = rho.size
    eye = sp.identity(nn, format="csc")
    cols: dict = {}
    times: list = []
    snaps: list = []

    def record(t, rho):
        row = free_energy(grid, rho)
        row["mass"] = float(rho.sum() * grid.cell)
        row["min_rho"] = float(rho.min())
        if observe is not None:
            row.update(observe(rho))
        times.append(t)
        for k, v in row.items():
            cols.setdefault(k, []).append(v)
        if keep_snapshots:
            snaps.append(rho.copy())

    def v_of(rho):
        return potential(grid, residual(grid, predict(grid, rho)))

    record(0.0, rho)
    V_prev = V_now = v_of(rho)
    n_fallback = 0
    for k in range(n_steps):
        V_half = 1.5 * V_now - 0.5 * V_prev
        Q = generator(grid, V_half)
        r = rho.ravel()
        if dt * float(np.max(-Q.diagonal())) <= 2.0:
            rhs = r + 0.5 * dt * (Q @ r)
            new = spla.spsolve(eye - 0.5 * dt * Q, rhs)
        else:
            n_fallback += 1
            new = spla.spsolve(eye - dt * Q, r)
        rho = np.maximum(new, 0.0).reshape(grid.shape)  # clips only rounding-level negatives
        V_prev, V_now = V_now, v_of(rho)
        if (k + 1) % record_every == 0 or k + 1 == n_steps:
            record((k + 1) * dt, rho)
    return FPResult(times=np.asarray(times), columns={k: np.asarray(v) for k, v in cols.items()},
                    rho=rho, n_fallback=n_fallback, snapshots=snaps)
