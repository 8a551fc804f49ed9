"""The Gibbs measure of a dual point and its integrals over the neurons' weights (float64 NumPy).

Given dual variables u (one per data point), rho_hat_u ~ exp(-V_u / tau) is the Gibbs measure
of the linearised objective (docs/theory.md sections 4, 6, 8). This module holds everything
about it that needs an integral over w:

- the problem in float64 (:class:`GibbsSpec`, :func:`make_spec`) and the network output of a
  particle system (:func:`network_output`);
- node sets over w (:class:`NodeSet`) with a cache of sigma(w x^T) keyed by the data and the
  activation object: quadrature grids on a ball of lattice points (:class:`Quadrature`) and
  Monte Carlo samples from an importance :class:`Proposal` adapted to the tilted density
  (:func:`adapt_proposal`, :func:`mc_nodes`);
- the integral over the output weight a given g(w) (:func:`components`: analytic for a
  trained layer, sign groups for a fixed one, a 1-D quadrature for a bounded one);
- the closed form for the linear activation (:func:`closed_form`), the choice among the three
  (:func:`choose_method`) and one total evaluation (:func:`evaluate_spec`) of log Z(u), the
  dual D(u), F(rho_hat_u) and their errors on a node set (:func:`evaluate_nodes`).

The dual and primal values are computed here, next to the integrals, because the quadrature's
error estimate is the difference of those values on two grids; :mod:`mfld.duality` is the
public face (D, F, log Z at a problem, the certificate along a run, its diagnostics).

Integration over w (``method``):

- ``closed_form``: linear activation, trained or fixed output layer (the Gibbs measure is
  Gaussian, THEORY 7). Certified.
- ``quadrature``: p = dim(w) <= 2. Tensor trapezoid rule on a box [-R, R]^p, whose radius
  comes from the bound on the weight (bounded sigma) or is grown until the log-integrand on
  the boundary is 40 nats below its maximum (at most 8 growths by 1.5x; if the integrand is
  still not negligible on the boundary -- e.g. a divergent Z(u) for an unbounded sigma with a
  trained output layer -- the evaluation returns D = -inf, F = +inf, the trivial bounds, with
  ``info["reason"]``); spacing h halved until the results at h and 2h
  agree (the rule converges spectrally for these smooth, Gaussian-decaying integrands, so the
  difference bounds the error of the finer one). The difference is reported as the quadrature
  error and subtracted from / added to the bounds. Certified.
- ``mc``: importance sampling over w ~ N(0, tau/lam I) (any p), with delta-method standard
  errors and the effective sample size. -tau log Z_hat is biased (Jensen): the reported lower
  bound is D_hat - 2 SE and the upper F_hat + 2 SE, labelled statistical (``certified`` 0).
  Weight diagnostics (THEORY 6: "warn when it collapses"): ``ess`` = (sum w)^2 / sum w^2 and
  ``pareto_k``, the Pareto-smoothed importance-sampling tail index k_hat (Vehtari et al.):
  the largest importance weights are fitted by a generalised Pareto law; the weights have
  finite variance iff k < 1/2, and above :data:`PARETO_K_MAX` = 0.7 the estimate is
  unreliable at any practical sample size. For the linear activation k = |c|^2 / lam^2
  exactly (the weight exp(g^2/(2 lam tau)) has tail P(W > t) ~ t^(-lam^2/|c|^2)), so THEORY's
  infinite-variance condition |c|^2 > lam^2/2 is k > 1/2. ``ess_low`` flags an effective
  sample size below :func:`ess_threshold` (max(100, 1% of the samples)); see
  :func:`mc_warnings` for the message a run puts in its notes.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
from scipy.special import logsumexp

from mfld import choices
from mfld.errors import ConfigError, TheoryNotApplicable
from mfld.importance import PARETO_K_MAX, ess_threshold, pareto_k

__all__ = [
    "METHODS", "PROPOSALS", "QUAD_MAX_DIM", "MEMORY_BUDGET", "QUAD_MAX_WORK", "QUAD_AUTO_WORK", "WITHHELD",
    "GibbsSpec", "make_spec", "check_applicable", "network_output", "sigma_rows", "sigma_matrix",
    "clear_cache", "cache_size", "NodeSet", "Proposal", "adapt_proposal", "log_target", "mc_sample_cap", "mc_nodes",
    "ball_indices", "ball_count", "grid_nodes", "bounded_inner", "components",
    "Evaluation", "evaluate_nodes", "infeasible", "closed_form", "sigma_growth",
    "Quadrature", "QuadratureOverBudget", "choose_method", "evaluate_spec",
]

METHODS = choices.CERTIFY_METHODS
PROPOSALS = choices.PROPOSALS
#: Largest dim(w) offered the (certified) tensor quadrature.
QUAD_MAX_DIM = 3
_MARGIN = 40.0  # nats: the integrand is negligible (e^-40 of its maximum) outside the ball
_MAX_NODES_X_DATA = 2 ** 24  # cap on (#nodes * n) for refining the quadrature grid (~128 MB of sigma values)
_CHUNK = 2 ** 21  # elements per chunk of sigma values when they are not cached
_QUAD_TOL = 1e-11

#: Memory budget (bytes) of one evaluation of log Z / D / F(rho_hat): node arrays plus one
#: chunk of sigma values. A quadrature whose first grid does not fit (or whose sigma
#: evaluations exceed :data:`QUAD_MAX_WORK`) is not attempted: ``auto`` falls back to Monte
#: Carlo with the adapted proposal, an explicit ``quadrature`` returns the trivial bounds
#: with the reason. Monte Carlo sample counts are capped by the same budget.
MEMORY_BUDGET = 2 ** 29
#: Largest number of sigma evaluations (nodes x data points) of one quadrature evaluation.
QUAD_MAX_WORK = 2 ** 27
#: The same for ``method="auto"``, which certifies at every record: the grid's sigma values
#: must fit the cache (so later records and the optimum solver's iterations reuse them);
#: beyond it ``auto`` uses Monte Carlo (cheaper per record, statistical).
QUAD_AUTO_WORK = 2 ** 24

#: Why a bound was withheld (the ``withheld`` column of :func:`certify`; 0: reported).
WITHHELD = {
    0: "",
    1: "non-finite particles or network output: the state diverged",
    2: "the Gibbs integral Z(u) diverges or could not be resolved (D = -inf)",
    3: "Monte Carlo effective sample size below the threshold",
    4: "Monte Carlo importance weights heavy-tailed (Pareto k_hat > 0.7)",
    5: "the evaluation was not finite (overflow in the data or the state)",
    6: "the quadrature does not fit the memory budget",
}


# ---------------------------------------------------------------------------------------
# The problem in float64 NumPy
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class GibbsSpec:
    """The problem in float64 NumPy: data, hyperparameters, sigma, the loss's NumPy forms."""

    x: np.ndarray
    y: np.ndarray
    lam: float
    tau: float
    r_out: float
    sigma: object
    act_name: str
    act_sup: float | None
    linear: bool
    loss: str
    output: str
    plus_fraction: float
    lossfn: object = None  # the mfld.losses.Loss
    key: tuple = field(default=("", None))  # the sigma cache's key: (data digest, user activation)

    @property
    def n(self):
        return self.x.shape[0]

    @property
    def p(self):
        return self.x.shape[1]

    # ---- the loss in float64 (mfld.losses' NumPy forms) ----
    def loss_value(self, f, y):
        return self.lossfn.np_value(f, y)

    def loss_deriv(self, f, y):
        return self.lossfn.np_derivative(f, y)

    def conj(self, u):
        return self.lossfn.np_conjugate(u, self.y)

    def conj_deriv(self, u):
        return self.lossfn.np_conjugate_derivative(u, self.y)


def check_applicable(problem) -> None:
    """Raise :class:`TheoryNotApplicable` unless tau > 0 and the scaling is mean-field."""
    if problem.scaling != "mean_field":
        raise TheoryNotApplicable(
            "the free energy, its dual and the certificates are defined for the mean-field scaling "
            f"only; this problem uses scaling={problem.scaling!r} (NTK runs have no mean-field measure)")
    if not float(problem.tau) > 0:
        raise TheoryNotApplicable(
            f"the dual, rho_hat and the certificates need a positive temperature; tau = {float(problem.tau)} "
            "(at tau = 0 the entropy term and the Gibbs measure are undefined)")


def make_spec(problem, plus_fraction: float = 0.5, need_tau: bool = True) -> GibbsSpec:
    """The problem in float64 NumPy for the Gibbs integrals (refuses tau = 0 unless
    ``need_tau`` is False, and NTK scaling)."""
    if need_tau:
        check_applicable(problem)
    elif problem.scaling != "mean_field":
        raise TheoryNotApplicable("the free energy is defined for the mean-field scaling only "
                                  f"(scaling={problem.scaling!r})")
    pf = float(plus_fraction)
    if not 0.0 <= pf <= 1.0:
        raise ConfigError("fraction of +1 output weights must lie in [0, 1]", field="model.init.plus_fraction",
                          value=plus_fraction, allowed="0 <= plus_fraction <= 1")
    x = np.asarray(problem.x, dtype=np.float64)
    y = np.asarray(problem.y, dtype=np.float64)
    act = problem.activation
    h = hashlib.sha1(x.tobytes())
    h.update(repr((x.shape, act.name)).encode())
    # a user activation is keyed by the object itself (held by the key, so that a collected
    # function's id can never be reused for another); a registered one by its name
    key = (h.hexdigest(), None if act.analytic else act)
    return GibbsSpec(x=x, y=y, lam=float(problem.lam), tau=float(problem.tau), r_out=float(problem.r_out),
                     sigma=act.np_fn, act_name=act.name, act_sup=act.sup,
                     linear=(act.analytic and act.name == "linear"), loss=problem.loss.name,
                     output=problem.output, plus_fraction=pf, lossfn=problem.loss, key=key)


def network_output(spec: GibbsSpec, a, w):
    """f_rho(x_j) of the empirical measure, mean-field scaling (float64), in blocks of
    particles so that no (N, n) array exceeds :data:`_CHUNK` elements. ``a`` (N,), ``w``
    (N, p) in any float precision: each block is upcast to float64 on its own (no float64
    copy of all the particles; the result is that of float64 copies, bit for bit)."""
    step = max(1, _CHUNK // max(spec.n, 1))
    f = np.zeros(spec.n)
    with np.errstate(over="ignore", invalid="ignore"):
        for i in range(0, a.shape[0], step):
            ab = np.asarray(a[i:i + step], dtype=np.float64)
            a_eff = spec.r_out * np.tanh(ab) if spec.output == "bounded" else ab
            f += a_eff @ spec.sigma(np.asarray(w[i:i + step], dtype=np.float64) @ spec.x.T)
    return f / a.shape[0]


# ---------------------------------------------------------------------------------------
# Node sets over w: quadrature grids and Monte Carlo samples, with cached sigma values
# ---------------------------------------------------------------------------------------

_CACHE: OrderedDict = OrderedDict()
_CACHE_BYTES = 3 * 10 ** 8


def clear_cache() -> None:
    """Forget every cached sigma matrix (a test's reference; memory is bounded anyway)."""
    _CACHE.clear()


def cache_size() -> int:
    """The number of sigma matrices held by the cache."""
    return len(_CACHE)


def sigma_matrix(spec: GibbsSpec, w: np.ndarray, key) -> np.ndarray | None:
    """sigma(w x^T) (K, n), cached by ``key``; None if too large to hold (then chunked)."""
    nbytes = w.shape[0] * spec.n * 8
    if nbytes > _CACHE_BYTES // 2:
        return None
    full_key = (spec.key, key)
    if full_key in _CACHE:
        _CACHE.move_to_end(full_key)
        return _CACHE[full_key]
    s = sigma_rows(spec, w)
    _CACHE[full_key] = s
    while sum(v.nbytes for v in _CACHE.values()) > _CACHE_BYTES and len(_CACHE) > 1:
        _CACHE.popitem(last=False)
    return s


@dataclass(eq=False)
class NodeSet:
    """Nodes w_k (K, p) with log base weights such that logsumexp(logbase + h(w_k)) ~
    log integral exp(-lam|w|^2/(2 tau) + h(w)) dw. ``S`` caches sigma(w x^T) when it fits."""

    w: np.ndarray
    logbase: np.ndarray
    S: np.ndarray | None
    kind: str  # "quadrature" or "mc"
    h: float = math.nan
    radius: float = math.nan
    proposal: object = None  # the importance proposal (Monte Carlo)
    shell: np.ndarray | None = None  # quadrature: nodes on the boundary of the ball

    def rows(self, spec):
        if self.S is not None:
            yield slice(0, self.w.shape[0]), self.S
            return
        step = max(1, _CHUNK // max(spec.n, 1))
        for i in range(0, self.w.shape[0], step):
            sl = slice(i, min(i + step, self.w.shape[0]))
            yield sl, sigma_rows(spec, self.w[sl])

    def matvec(self, spec, v):
        out = np.empty(self.w.shape[0])
        for sl, s in self.rows(spec):
            out[sl] = s @ v
        return out

    def rmatvec(self, spec, c):
        """c (m, K) -> c @ S (m, n)."""
        out = np.zeros((c.shape[0], spec.n))
        for sl, s in self.rows(spec):
            out += c[:, sl] @ s
        return out

    def subset(self, idx, logbase):
        return NodeSet(self.w[idx], logbase, None if self.S is None else self.S[idx], self.kind,
                      self.h * 2, self.radius)


@dataclass(frozen=True, eq=False)
class Proposal:
    """Importance proposal over w: the defensive mixture
    q = alpha N(0, s^2 I) + (1 - alpha)/C sum_c N(m_c, L_c L_c^T), s^2 = tau/lam (the prior).

    The prior component keeps every importance weight target/q at most 1/alpha times the
    weight under the prior alone, so adapting can only help (Hesterberg's defensive
    importance sampling); the Gaussian components are fitted to the tilted densities
    (one per sign group of a fixed output layer), see :func:`adapt_proposal`.
    """

    sd: float
    alpha: float = 1.0
    means: np.ndarray | None = None  # (C, p)
    chols: np.ndarray | None = None  # (C, p, p) lower Cholesky factors

    @property
    def n_components(self) -> int:
        return 0 if self.means is None else int(self.means.shape[0])

    def sample(self, rng, m: int, p: int) -> np.ndarray:
        z = rng.standard_normal((m, p))
        if self.n_components == 0 or self.alpha >= 1.0:
            return self.sd * z
        probs = np.concatenate([[self.alpha], np.full(self.n_components, (1.0 - self.alpha) / self.n_components)])
        comp = rng.choice(probs.size, size=m, p=probs)
        w = self.sd * z
        for c in range(self.n_components):
            sel = comp == c + 1
            w[sel] = self.means[c] + z[sel] @ self.chols[c].T
        return w

    def logpdf(self, w: np.ndarray) -> np.ndarray:
        p = w.shape[1]
        prior = (-0.5 * np.sum(w * w, axis=1) / self.sd ** 2 - p * math.log(self.sd)
                 - 0.5 * p * math.log(2 * math.pi))
        if self.n_components == 0 or self.alpha >= 1.0:
            return prior
        terms = [math.log(self.alpha) + prior]
        lc = math.log((1.0 - self.alpha) / self.n_components)
        for m_c, L in zip(self.means, self.chols, strict=True):
            r = np.linalg.solve(L, (w - m_c).T)  # (p, M): L^-1 (w - m)
            logdet = float(np.sum(np.log(np.diag(L))))
            terms.append(lc - 0.5 * np.sum(r * r, axis=0) - logdet - 0.5 * p * math.log(2 * math.pi))
        return logsumexp(np.stack(terms), axis=0)

    def as_dict(self) -> dict:
        return {"alpha": self.alpha, "components": self.n_components,
                "means": None if self.means is None else self.means.tolist()}


#: Defensive weight of the prior in an adapted proposal.
PROPOSAL_DEFENSIVE = 0.1
#: Adaptation stages and the pilot sample of each.
PROPOSAL_STAGES = 4
PROPOSAL_PILOT = 4096
#: Variance inflation of the fitted Gaussians (pilot stages, final proposal).
_INFLATE_PILOT, _INFLATE_FINAL = 1.5, 1.2


def log_target(spec: GibbsSpec, w: np.ndarray, lc: np.ndarray) -> np.ndarray:
    return -0.5 * spec.lam / spec.tau * np.sum(w * w, axis=1) + lc


def adapt_proposal(spec: GibbsSpec, u: np.ndarray, rng, *, stages: int = PROPOSAL_STAGES,
                   pilot: int = PROPOSAL_PILOT) -> Proposal:
    """Fit the proposal to the tilted densities mu_c(w) ~ exp(-lam|w|^2/(2 tau) + l_c(w)) at u.

    Population Monte Carlo with moment matching: start from the prior; at each stage draw
    ``pilot`` points from the current proposal, weight them by target/proposal and set each
    component to the weighted mean and the (inflated) weighted covariance, shrunk towards
    the prior covariance when the pilot's own effective sample size is small. The fitted
    proposal is then used with *fresh* samples (the pilot's are discarded), so the final
    estimate and its standard error are those of plain importance sampling.
    """
    p, sd = spec.p, math.sqrt(spec.tau / spec.lam)
    prop = Proposal(sd)
    if not np.all(np.isfinite(u)):
        return prop
    for stage in range(stages):
        w = prop.sample(rng, pilot, p)
        g = sigma_rows(spec, w) @ u / spec.n
        if not np.all(np.isfinite(g)):
            return prop
        comps, _, _ = components(spec, g)
        logq = prop.logpdf(w)
        inflate = _INFLATE_FINAL if stage == stages - 1 else _INFLATE_PILOT
        means, chols = [], []
        for _pi, lc, _b in comps:
            lw = log_target(spec, w, lc) - logq
            if not np.all(np.isfinite(lw)):
                return prop
            om = np.exp(lw - logsumexp(lw))
            ess = 1.0 / float(om @ om)
            mean = om @ w
            dev = w - mean
            cov = (dev.T * om) @ dev
            k = p + 2.0  # prior pseudo-observations: a pilot with a handful of effective points stays near the prior
            cov = (ess * inflate * cov + k * sd * sd * np.eye(p)) / (ess + k)
            mean = ess * mean / (ess + k)
            try:
                chols.append(np.linalg.cholesky(cov + 1e-12 * sd * sd * np.eye(p)))
            except np.linalg.LinAlgError:
                return prop
            means.append(mean)
        prop = Proposal(sd, PROPOSAL_DEFENSIVE, np.array(means), np.array(chols))
    return prop


def sigma_rows(spec: GibbsSpec, w: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):
        return spec.sigma(w @ spec.x.T)


def mc_sample_cap(spec: GibbsSpec, memory_budget: int | None) -> int:
    """Largest Monte Carlo sample whose node arrays and sigma matrix fit the memory budget."""
    budget = MEMORY_BUDGET if memory_budget is None else int(memory_budget)
    return max(1024, budget // (8 * (spec.p + spec.n + 16)))


def mc_nodes(spec: GibbsSpec, n_samples: int, seed: int, u=None, *, proposal: Proposal | None = None) -> NodeSet:
    """``n_samples`` importance-sampling nodes: from ``proposal``, else the proposal adapted
    to u (:func:`adapt_proposal`), else the prior N(0, tau/lam I)."""
    m = int(n_samples)
    if m < 2:
        raise ConfigError("need at least 2 Monte Carlo samples", field="record.certify_samples", value=m)
    sd = math.sqrt(spec.tau / spec.lam)
    rng = np.random.default_rng([int(seed), 7919])
    if proposal is None:
        proposal = Proposal(sd) if u is None else adapt_proposal(spec, np.asarray(u, dtype=np.float64), rng)
    w = proposal.sample(rng, m, spec.p)
    with np.errstate(over="ignore", invalid="ignore"):
        logbase = log_target(spec, w, 0.0) - proposal.logpdf(w) - math.log(m)
    key = ("mc", hashlib.sha1(w.tobytes()).hexdigest())
    S = sigma_matrix(spec, w, key)
    nodes = NodeSet(w, logbase, S, "mc")
    nodes.proposal = proposal
    return nodes


def ball_indices(p: int, half: int) -> np.ndarray:
    """Integer points i in {-half..half}^p with |i|_2 <= half (built slice by slice, so the
    cube is never materialised)."""
    idx1 = np.arange(-half, half + 1)
    if p == 1:
        return idx1[:, None]
    mesh = np.meshgrid(*([idx1] * (p - 1)), indexing="ij")
    rest = np.stack([m.reshape(-1) for m in mesh], axis=1)
    r2 = np.sum(rest * rest, axis=1)
    parts = []
    for i0 in idx1:
        sel = rest[r2 <= half * half - i0 * i0]
        parts.append(np.concatenate([np.full((sel.shape[0], 1), i0), sel], axis=1))
    return np.concatenate(parts, axis=0)


def ball_count(p: int, half: int) -> float:
    """An upper estimate of the number of lattice points in the ball of radius ``half``."""
    vol = math.pi ** (p / 2) / math.gamma(p / 2 + 1) * (half + 1.0) ** p
    return min(vol * 1.05 + 2.0 * (2 * half + 1) ** (p - 1), float(2 * half + 1) ** p)


def grid_nodes(spec: GibbsSpec, half: int, h: float) -> tuple[NodeSet, NodeSet]:
    """The fine grid h * {i in Z^p : |i| <= half} (a ball: the integrand is negligible outside
    it, see :class:`Quadrature`) and its even-index subgrid (spacing 2h, ``half`` even)."""
    ij = ball_indices(spec.p, half)
    w = h * ij
    base = -0.5 * spec.lam / spec.tau * np.sum(w * w, axis=1)
    S = sigma_matrix(spec, w, ("grid", spec.p, half, float(h)))
    fine = NodeSet(w, base + spec.p * math.log(h), S, "quadrature", h, half * h)
    sel = np.nonzero(np.all(ij % 2 == 0, axis=1))[0]
    coarse = fine.subset(sel, base[sel] + spec.p * math.log(2 * h))
    fine.shell = np.sum(ij * ij, axis=1) > (half - 1.5) ** 2  # the outermost layer of nodes
    return fine, coarse


# ---------------------------------------------------------------------------------------
# Components: how the a-direction (or the sign groups) enter, given g(w) at the nodes
# ---------------------------------------------------------------------------------------


def bounded_inner(spec: GibbsSpec, g: np.ndarray, fine: bool = True):
    """For phi = r tanh(a) sigma: log J(g) = log integral exp(-(lam a^2/2 + r tanh(a) g)/tau) da
    and the conditional mean r E[tanh a | w], by the trapezoid rule on a uniform a-grid
    (plus the same at twice the spacing, for the error estimate)."""
    sa = math.sqrt(spec.tau / spec.lam)
    gmax = float(np.max(np.abs(g))) if g.size else 0.0
    tilt = spec.r_out * gmax / spec.tau
    ra = sa * math.sqrt(2.0 * (_MARGIN + 5.0 + 2.0 * tilt))
    curv = 1.0 / sa ** 2 + 0.77 * tilt
    ha = min(0.5 / math.sqrt(curv), 0.3) / 2.0
    half = int(math.ceil(ra / ha))
    ag = ha * np.arange(-half, half + 1)
    ta = np.tanh(ag)
    out = []
    for step in (1, 2):
        sl = slice(None, None, step) if step == 1 else (np.arange(-half, half + 1) % 2 == 0)
        a_, t_ = ag[sl], ta[sl]
        lw = -0.5 * spec.lam / spec.tau * a_ ** 2 - (spec.r_out / spec.tau) * np.outer(g, t_)
        lse = logsumexp(lw, axis=1)
        wts = np.exp(lw - lse[:, None])
        out.append((lse + math.log(ha * step), spec.r_out * (wts @ t_)))
    (lj, mt), (lj2, mt2) = out
    err = float(np.max(np.abs(lj - lj2))) if g.size else 0.0
    return lj, mt, err, (ag, ta)


def components(spec: GibbsSpec, g: np.ndarray):
    """List of (mass pi_c, log weight l_c(w) (K,), conditional output weight b_c(w) (K,)),
    plus the constant added to each log Z_c and an error of the inner a-quadrature."""
    lam, tau = spec.lam, spec.tau
    if spec.output == "trained":
        return [(1.0, g * g / (2 * lam * tau), -g / lam)], 0.5 * math.log(2 * math.pi * tau / lam), 0.0
    if spec.output == "fixed":
        pf = spec.plus_fraction
        comps = []
        if pf > 0:
            comps.append((pf, -g / tau, np.ones_like(g)))
        if pf < 1:
            comps.append((1.0 - pf, g / tau, -np.ones_like(g)))
        return comps, 0.0, 0.0
    lj, mt, err, _ = bounded_inner(spec, g)
    return [(1.0, lj, mt)], 0.0, err


# ---------------------------------------------------------------------------------------
# One evaluation of D, F(rho_hat), the gradient, on a node set
# ---------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """D(u), F(rho_hat_u), grad D, f_hat on the data and their error estimates.

    ``err_D``/``err_F``: quadrature error estimates (0 for the closed form, nan for MC);
    ``se_D``/``se_F``: Monte Carlo standard errors (0 otherwise); ``ess``: effective sample
    size (nan unless MC; the smallest over the sign groups); ``pareto_k``: the weights' tail
    index k_hat (nan unless MC with ``stats``; the largest over the groups); ``n_samples``:
    the Monte Carlo sample size; ``tau_log_z``: tau sum_c pi_c log Z_c.
    """

    D: float
    F: float
    grad: np.ndarray
    f_hat: np.ndarray
    tau_log_z: float
    method: str
    certified: bool
    err_D: float = 0.0
    err_F: float = 0.0
    se_D: float = 0.0
    se_F: float = 0.0
    ess: float = math.nan
    pareto_k: float = math.nan
    n_samples: int = 0
    info: dict = field(default_factory=dict)

    @property
    def ess_low(self) -> bool:
        """True for a Monte Carlo evaluation whose effective sample size collapsed."""
        return self.method == "mc" and bool(self.ess < ess_threshold(self.n_samples))

    @property
    def withheld(self) -> int:
        """0 when the bounds are reported, else why not (a key of :data:`WITHHELD`)."""
        if self.info.get("withheld"):
            return int(self.info["withheld"])
        if self.D == -math.inf:
            return 2
        if not (math.isfinite(self.D) and math.isfinite(self.F)):
            return 5
        if self.method == "mc":
            if self.ess_low:
                return 3
            if self.pareto_k > PARETO_K_MAX:
                return 4
        return 0

    @property
    def reason(self) -> str:
        """Why the bounds are withheld ('' when they are reported)."""
        code = self.withheld
        if not code:
            return ""
        extra = self.info.get("reason")
        if code in (3, 4):
            extra = f"ESS {self.ess:.3g} of {self.n_samples} samples, Pareto k_hat {self.pareto_k:.2g}"
        return WITHHELD[code] + (f" ({extra})" if extra and extra != WITHHELD[code] else "")

    @property
    def lower(self) -> float:
        """A lower bound on F* (statistical, D - 2 SE, if Monte Carlo); -inf when withheld."""
        if self.withheld:
            return -math.inf
        return self.D - (2.0 * self.se_D if self.method == "mc" else self.err_D)

    @property
    def upper(self) -> float:
        """An upper bound on F* (statistical, F + 2 SE, if Monte Carlo); +inf when withheld."""
        if self.withheld:
            return math.inf
        return self.F + (2.0 * self.se_F if self.method == "mc" else self.err_F)


def evaluate_nodes(spec: GibbsSpec, nodes: NodeSet, u: np.ndarray, *, stats: bool = False) -> Evaluation:
    n = spec.n
    g = nodes.matvec(spec, u) / n
    comps, const, inner_err = components(spec, g)
    tlz = 0.0
    coef = np.zeros((len(comps), nodes.w.shape[0]))
    omegas = []
    ess = math.inf
    lws = []
    for i, (pi_c, lc, bc) in enumerate(comps):
        lw = nodes.logbase + lc
        lws.append(lw)
        lse = logsumexp(lw)
        if not np.isfinite(lse):
            return infeasible(spec, u, nodes.kind)
        om = np.exp(lw - lse)
        omegas.append(om)
        tlz += spec.tau * pi_c * (const + lse)
        coef[i] = pi_c * om * bc
        ess = min(ess, 1.0 / float(om @ om))
    fc = nodes.rmatvec(spec, coef)  # (C, n): pi_c E_c[b sigma]
    f_hat = fc.sum(axis=0)
    conj = spec.conj(u)
    D = float(-np.mean(conj) - tlz)
    F = float(np.mean(spec.loss_value(f_hat, spec.y)) - np.mean(u * f_hat) - tlz)
    grad = (f_hat - spec.conj_deriv(u)) / n
    ev = Evaluation(D, F, grad, f_hat, tlz, nodes.kind, nodes.kind == "quadrature")
    ev.info["inner_err"] = inner_err * spec.tau
    # strength of the tilt where the mass is: E_mu[g(w)^2] / (lam tau) (first component)
    ev.info["tilt"] = float(omegas[0] @ (g * g)) / (spec.lam * spec.tau)
    if nodes.kind == "mc":
        ev.ess = ess
        ev.n_samples = int(nodes.w.shape[0])
        if stats:
            ev.pareto_k = max(pareto_k(lw) for lw in lws)
            m = nodes.w.shape[0]
            cvec = (spec.loss_deriv(f_hat, spec.y) - u) / n
            sc = nodes.matvec(spec, cvec)  # sum_j cvec_j sigma(w_k x_j)
            psi_d = np.zeros(m)
            psi_f = np.zeros(m)
            for i, (pi_c, _lc, bc) in enumerate(comps):
                wt = m * omegas[i]
                psi_d += -spec.tau * pi_c * (wt - 1.0)
                psi_f += pi_c * wt * (bc * sc - float(fc[i] @ cvec) / pi_c)
            psi_f += psi_d
            ev.se_D = float(np.std(psi_d) / math.sqrt(m))
            ev.se_F = float(np.std(psi_f) / math.sqrt(m))
    return ev


def infeasible(spec, u, kind):
    nan = np.full(spec.n, np.nan)
    return Evaluation(-math.inf, math.inf, nan, nan, math.inf, kind, kind != "mc")


# ---------------------------------------------------------------------------------------
# Integrators
# ---------------------------------------------------------------------------------------

def closed_form(spec: GibbsSpec, u: np.ndarray) -> Evaluation:
    """Linear activation: Gaussian integrals (THEORY 7)."""
    lam, tau, n, p = spec.lam, spec.tau, spec.n, spec.p
    c = spec.x.T @ u / n
    c2 = float(c @ c)
    if spec.output == "trained":
        q = lam * lam - c2
        if not q > 0:
            return infeasible(spec, u, "closed_form")
        log_z = 0.5 * (p + 1) * math.log(2 * math.pi * tau) - 0.5 * (p - 1) * math.log(lam) - 0.5 * math.log(q)
        m = -tau * c / q  # E[a w]
        tlz = tau * log_z
    else:  # fixed: w ~ N(-s c/lam, tau/lam I) in group s; log Z_s = (p/2) log(2 pi tau/lam) + |c|^2/(2 lam tau)
        tlz = tau * (0.5 * p * math.log(2 * math.pi * tau / lam)) + c2 / (2 * lam)
        m = -c / lam  # sum_s pi_s s E_s[w]
    f_hat = spec.x @ m
    D = float(-np.mean(spec.conj(u)) - tlz)
    F = float(np.mean(spec.loss_value(f_hat, spec.y)) - np.mean(u * f_hat) - tlz)
    return Evaluation(D, F, (f_hat - spec.conj_deriv(u)) / n, f_hat, tlz, "closed_form", True)


def sigma_growth(spec: GibbsSpec, u: np.ndarray) -> float | None:
    """A bound B on the spread of the log weight over w (bounded sigma), else None."""
    if spec.act_sup is None:
        return None
    G = spec.act_sup * float(np.mean(np.abs(u)))
    if spec.output == "trained":
        return G * G / (2 * spec.lam * spec.tau)
    if spec.output == "fixed":
        return 2 * G / spec.tau
    return 2 * spec.r_out * G / spec.tau


class QuadratureOverBudget(TheoryNotApplicable):
    """No quadrature grid for this integrand fits the memory/work budget."""


class Quadrature:
    """Adaptive trapezoid rule over w on a ball of lattice points (p <= :data:`QUAD_MAX_DIM`);
    see the module docstring.

    ``unresolved``: None, or (withheld code, reason) when no grid within the memory budget
    holds the integrand (code 6: the first grid does not fit; code 2: Z(u) diverges or the
    largest ball does not hold it); then :meth:`evaluate` returns the trivial bounds.
    """

    def __init__(self, spec: GibbsSpec, u: np.ndarray, *, tol: float = _QUAD_TOL, max_levels: int = 6,
                 memory_budget: int | None = None, max_work: int = QUAD_MAX_WORK):
        self.spec = spec
        self.max_work = int(max_work)
        self.budget = MEMORY_BUDGET if memory_budget is None else int(memory_budget)
        s = math.sqrt(spec.tau / spec.lam)
        with np.errstate(over="ignore", invalid="ignore"):
            xmax = float(np.max(np.linalg.norm(spec.x, axis=1))) if spec.n else 0.0
        self.h0 = min(s, 1.0 / max(xmax, 1e-12)) / 2.0 if math.isfinite(xmax) else 0.0
        self.tol = tol
        self.max_levels = max_levels
        self.unresolved = None
        B = sigma_growth(spec, u)
        if not (math.isfinite(self.h0) and self.h0 > 0 and (B is None or math.isfinite(B))):
            self.radius = math.inf
            self.unresolved = (6, "the data or the dual point is too large for any quadrature grid within the "
                                  f"budget (max |x| = {xmax:.3g}, spread of the log weight {B})")
            return
        radius = s * math.sqrt(2.0 * ((B if B is not None else 0.0) + _MARGIN + 5.0))
        radius = s * math.ceil(radius / s)  # quantised, so that nearby u's share a cached grid
        self.radius = radius
        why = self._unaffordable(2 * int(math.ceil(radius / self.h0)) if radius / self.h0 < 1e9 else 10 ** 9)
        if why:
            self.unresolved = (6, why)
            return
        if B is None:
            self.radius, self.unresolved = self._grow_radius(u, radius)

    def nodes_estimate(self, half: int) -> float:
        return ball_count(self.spec.p, half)

    def _unaffordable(self, half: int) -> str | None:
        """Why a fine grid of ``half`` points per radius does not fit the budget, or None."""
        k = self.nodes_estimate(half)
        mem = k * (16 * self.spec.p + 96) + 8 * _CHUNK
        if mem > self.budget or k * max(self.spec.n, 1) > self.max_work:
            return (f"a quadrature grid for this integrand needs about {k:.3g} nodes in dim(w) = {self.spec.p} "
                    f"({mem / 2 ** 20:.3g} MiB, {k * self.spec.n:.3g} sigma evaluations), over the budget "
                    f"({self.budget / 2 ** 20:.3g} MiB, {self.max_work:.3g} evaluations)")
        return None

    def _grow_radius(self, u, radius, growths: int = 8):
        """Grow the ball's radius by 1.5x (at most ``growths`` times) until the log weight on
        its boundary is ``_MARGIN`` nats below its maximum. Returns (radius, None) on success,
        else (radius, (code, reason)): the integrand is not negligible on the largest ball
        (it diverges if it still grows towards the boundary) or the ball exceeds the budget."""
        spec = self.spec
        edge = top = math.nan
        for k in range(growths + 1):
            half = int(math.ceil(radius / self.h0))
            why = self._unaffordable(half)
            if why:
                return radius, (6, why)
            fine, _ = grid_nodes(spec, half, self.h0)
            g = fine.matvec(spec, u) / spec.n
            comps, _, _ = components(spec, g)
            lw = np.max([fine.logbase + c[1] for c in comps], axis=0)
            edge, top = float(np.max(lw[fine.shell])), float(np.max(lw))
            if edge < top - _MARGIN:
                return radius, None
            if k < growths:
                radius *= 1.5
        how = ("the log-integrand is largest on the boundary: the Gibbs integral Z(u) diverges (D = -inf)"
               if edge >= top else
               f"the log-integrand on the boundary is only {top - edge:.3g} nats below its maximum "
               f"(< {_MARGIN:g})")
        return radius, (2, f"quadrature ball grown to radius {radius:.4g} and {how}; "
                           "no certified value: D = -inf, F = +inf (the trivial bounds)")

    def evaluate(self, u, stats=False) -> Evaluation:
        spec = self.spec
        if self.unresolved is not None:
            ev = infeasible(spec, u, "quadrature")
            ev.info["withheld"], ev.info["reason"] = self.unresolved
            return ev
        h = self.h0
        last = None
        for level in range(self.max_levels):
            half = 2 * int(math.ceil(self.radius / h))
            if last is not None and (self.nodes_estimate(half) * spec.n > _MAX_NODES_X_DATA
                                     or self._unaffordable(half)):
                break
            fine, coarse = grid_nodes(spec, half, h / 2.0)
            ef = evaluate_nodes(spec, fine, u)
            ec = evaluate_nodes(spec, coarse, u)
            if not (np.isfinite(ef.D) and np.isfinite(ec.D)):
                ef.info["withheld"] = 2
                ef.info["reason"] = "the Gibbs integral is not finite on the quadrature grid"
                return ef
            ef.err_D = abs(ef.D - ec.D) + ef.info["inner_err"]
            ef.err_F = abs(ef.F - ec.F) + ef.info["inner_err"]
            ef.info.update(h=h / 2.0, radius=half * h / 2.0, nodes=fine.w.shape[0],
                           grad_err=float(np.max(np.abs(ef.grad - ec.grad))), level=level)
            ef.info["nodes_obj"] = fine
            last = ef
            if max(ef.err_D, ef.err_F) <= self.tol * max(1.0, abs(ef.D)):
                break
            h /= 2.0
        return last

    def fixed(self, u):
        """A fixed node set (the accepted fine grid at u), for repeated evaluations. Raises
        :class:`TheoryNotApplicable` if D(u) = -inf (no grid holds the integrand)."""
        ev = self.evaluate(u)
        if "nodes_obj" not in ev.info and ev.info.get("withheld") == 6:
            raise QuadratureOverBudget(ev.info["reason"])
        if "nodes_obj" not in ev.info:
            raise TheoryNotApplicable("the Gibbs integral Z(u) is not finite at this u (D(u) = -inf): "
                                      + ev.info.get("reason", "it diverges on the quadrature grid"))
        return ev.info["nodes_obj"], ev


def choose_method(spec: GibbsSpec, method: str) -> str:
    if method not in METHODS:
        raise ConfigError("unknown certificate method", field="record.certify_method", value=method,
                          allowed=", ".join(METHODS))
    if method == "auto":
        if choices.closed_form_applies(spec.linear, spec.output):
            return "closed_form"
        return "quadrature" if spec.p <= QUAD_MAX_DIM else "mc"
    if method == "closed_form" and not choices.closed_form_applies(spec.linear, spec.output):
        raise ConfigError("the closed form needs the linear activation and a trained or fixed output layer",
                          field="record.certify_method", value=method, allowed="auto, quadrature, mc")
    if method == "quadrature" and spec.p > QUAD_MAX_DIM:
        raise ConfigError(f"quadrature is offered for dim(w) <= {QUAD_MAX_DIM}, this problem has "
                          f"dim(w) = {spec.p}", field="record.certify_method", value=method, allowed="auto, mc")
    return method



def evaluate_spec(spec: GibbsSpec, u, method="auto", n_samples=65536, seed=0, memory_budget=None,
                   proposal="adapted") -> Evaluation:
    """One total evaluation: never raises for a state (non-finite or huge u, unresolvable
    integrands give the trivial bounds with ``info["withheld"]``/``info["reason"]``)."""
    u = np.asarray(u, dtype=np.float64).reshape(-1)
    if u.shape != (spec.n,):
        raise ConfigError(f"u must have one entry per data point ({spec.n}), got shape {u.shape}", field="u")
    m = choose_method(spec, method)
    if not np.all(np.isfinite(u)):
        ev = infeasible(spec, u, m)
        ev.info.update(withheld=1, reason=WITHHELD[1])
        return ev
    if m == "closed_form":
        return closed_form(spec, u)
    fallback = None
    if m == "quadrature":
        quad = Quadrature(spec, u, memory_budget=memory_budget,
                           max_work=QUAD_AUTO_WORK if method == "auto" else QUAD_MAX_WORK)
        if quad.unresolved is None or quad.unresolved[0] != 6 or method != "auto":
            return quad.evaluate(u)
        fallback = quad.unresolved[1] + "; Monte Carlo with an adapted proposal used instead (statistical)"
    if proposal not in PROPOSALS:
        raise ConfigError("unknown importance proposal", field="proposal", value=proposal,
                          allowed=", ".join(PROPOSALS))
    m_eff = min(int(n_samples), mc_sample_cap(spec, memory_budget))
    ev = evaluate_nodes(spec, mc_nodes(spec, m_eff, seed, u if proposal == "adapted" else None), u, stats=True)
    if fallback:
        ev.info["fallback"] = fallback
    if m_eff < int(n_samples):
        ev.info["samples_capped"] = f"{int(n_samples)} samples capped to {m_eff} by the memory budget"
    return ev
