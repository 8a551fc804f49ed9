"""The global optimum rho* of the free energy, by maximising the dual (THEORY sections 4, 6).

F* = max_u D(u), D concave and smooth, u in R^n (one variable per data point). The maximiser
u* gives f* on the data (u*_j = l'(f*(x_j), y_j)) and rho* = rho_hat_{u*}.

Solver: L-BFGS with a backtracking (Armijo) line search that halves the step whenever the
trial point is infeasible (D = -inf: the Gibbs integral diverges, e.g. |c(u)| >= lam for the
linear activation; THEORY 6 pitfalls), started from u = 0 (squared loss) or u = l'(0, y)
(logistic). The logistic start is halved towards 0 until D is finite (u = l'(0, y) can be
infeasible, e.g. |c(u)| >= lam for the linear activation with a small lam; near u = 0 the
Gibbs integral is a Gaussian one); if no feasible start is found the solver raises
:class:`mfld.errors.TheoryNotApplicable`. The logistic dual is box-constrained (-u_j y_j in [0, 1]); it is solved in the
unconstrained variables u_j = -y_j sigmoid(v_j). SciPy's L-BFGS-B is not used because its
line search does not recover from infinite values.

Integration over w: closed form (linear activation), quadrature (dim w <= 2: the grid is
re-chosen at the maximiser and the solve repeated until the grid is stable), or Monte Carlo
on a fixed sample of w's, doubled until F* is stable to ``tol`` or to its standard error;
D is then re-evaluated at the maximiser on a fresh, independent sample (an MC maximum of D
can exceed F*; a fresh evaluation is an unbiased-in-distribution lower estimate).

``F_star`` is D(u*) (a lower bound up to quadrature error / SE); ``F_star_err`` bounds
|F* - F_star|: the duality gap at u* plus the quadrature error (or 2 SE for Monte Carlo).
All in float64 NumPy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.special import expit, logsumexp

from mfld import choices, gibbs
from mfld.errors import ConfigError, TheoryNotApplicable
from mfld.gibbs import Quadrature, closed_form, evaluate_nodes, make_spec, mc_nodes
from mfld.serialize import jsonable

__all__ = ["Optimum", "solve_optimum", "maximise_dual"]


# ---------------------------------------------------------------------------------------
# A small L-BFGS maximiser that keeps its iterates feasible
# ---------------------------------------------------------------------------------------


def _lbfgs_min(fun, x0, *, gtol=1e-11, maxiter=5000, memory=20):
    """Minimise ``fun(x) -> (f, g)``; infinite f marks infeasible points (step halved).
    An infeasible starting point raises :class:`TheoryNotApplicable`."""
    x = np.array(x0, dtype=np.float64)
    fx, gx = fun(x)
    if not np.isfinite(fx):
        raise TheoryNotApplicable(
            "the dual D(u) is -inf at the starting point of its maximisation (the Gibbs integral "
            "Z(u) diverges there), so the optimum cannot be computed from it")
    S, Y = [], []
    it = 0
    nfev = 1
    status = "maxiter"
    for it in range(1, maxiter + 1):  # noqa: B007
        if np.max(np.abs(gx)) <= gtol:
            status = "converged"
            break
        q = gx.copy()
        alphas = []
        for s, y in zip(reversed(S), reversed(Y), strict=True):
            r = 1.0 / (y @ s)
            a = r * (s @ q)
            alphas.append((a, r))
            q -= a * y
        if S:
            q *= (S[-1] @ Y[-1]) / (Y[-1] @ Y[-1])
        else:
            q *= min(1.0, 1.0 / max(np.linalg.norm(gx), 1e-300))
        for (a, r), s, y in zip(reversed(alphas), S, Y, strict=True):
            b = r * (y @ q)
            q += (a - b) * s
        d = -q
        gd = float(gx @ d)
        if not gd < 0:
            S, Y = [], []
            d = -gx * min(1.0, 1.0 / max(np.linalg.norm(gx), 1e-300))
            gd = float(gx @ d)
        step = 1.0
        noise = 1e-15 * max(1.0, abs(fx))
        while True:
            xn = x + step * d
            fn, gn = fun(xn)
            nfev += 1
            if np.isfinite(fn) and fn <= fx + 1e-4 * step * gd + noise:
                break
            step *= 0.5
            if step < 1e-30:
                return x, fx, gx, dict(iterations=it, nfev=nfev, status="line search failed")
        s_, y_ = xn - x, gn - gx
        if s_ @ y_ > 1e-12 * np.linalg.norm(s_) * np.linalg.norm(y_):
            S.append(s_)
            Y.append(y_)
            if len(S) > memory:
                S.pop(0)
                Y.pop(0)
        x, fx, gx = xn, fn, gn
    return x, fx, gx, dict(iterations=it, nfev=nfev, status=status)


def maximise_dual(spec, evaluate, u0, *, gtol=1e-11, maxiter=5000):
    """Maximise D(u) given ``evaluate(u) -> Evaluation`` on a fixed integrator.

    Squared loss: over u directly. Logistic: over v with u = -y sigmoid(v). Returns
    ``(u*, Evaluation at u*, solver info)``.
    """
    y = spec.y
    if spec.loss == "logistic":
        q0 = np.clip(-np.asarray(u0) * y, 1e-12, 1 - 1e-12)
        v0 = np.log(q0) - np.log1p(-q0)
        to_u = lambda v: -y * expit(v)  # noqa: E731

        def fun(v):
            u = to_u(v)
            ev = evaluate(u)
            if not np.isfinite(ev.D):
                return math.inf, np.zeros_like(v)
            q = expit(v)
            return -ev.D, ev.grad * y * q * (1 - q)

        # gtol applies to grad_u; grad_v = grad_u * q(1-q) <= grad_u / 4
        v, _, _, info = _lbfgs_min(fun, v0, gtol=gtol * 0.25, maxiter=maxiter)
        u = to_u(v)
    else:

        def fun(u):
            ev = evaluate(u)
            if not np.isfinite(ev.D):
                return math.inf, np.zeros_like(u)
            return -ev.D, -ev.grad

        u, _, _, info = _lbfgs_min(fun, np.asarray(u0, dtype=np.float64), gtol=gtol, maxiter=maxiter)
    return u, evaluate(u), info


# ---------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------


@dataclass
class Optimum:
    """The optimum of the free energy.

    F_star: D(u*); F_star_err: bound on |F* - F_star| (duality gap at u* + quadrature error,
    or + 2 SE for Monte Carlo); F_star_upper: F(rho_hat_{u*}) (+ its error);
    u: u* (n,); f: f* on the training data (n,); method: closed_form / quadrature / mc;
    mean, cov: mean and covariance of theta = (a, w) under rho* ((p+1,) and (p+1, p+1); w
    only for a fixed output layer); info: solver details. ``sample(seed, n)`` draws from
    rho* (needs the problem: given to :func:`solve_optimum`, or to :meth:`from_json`).
    """

    F_star: float
    F_star_err: float
    F_star_upper: float
    u: np.ndarray
    f: np.ndarray
    method: str
    mean: np.ndarray
    cov: np.ndarray
    plus_fraction: float = 0.5
    info: dict = field(default_factory=dict)
    problem: object = field(default=None, repr=False)

    # ---- sampling from rho* = rho_hat_{u*} ----
    def sample(self, key_or_seed, n: int):
        """Draw ``n`` particles (a (n,), w (n, p)), float64 NumPy, from rho* = rho_hat_{u*}.

        w: from the tilted Gaussian (closed form: exact; quadrature: a grid node drawn with
        its quadrature weight, then jittered uniformly within its cell; Monte Carlo:
        importance resampling of fresh N(0, tau/lam I) draws); then a | w ~ N(-g(w)/lam,
        tau/lam) (trained), the 1-D conditional on an a-grid (bounded), or the fixed signs
        (round(plus_fraction * n) of +1 first).
        """
        if self.problem is None:
            raise ConfigError("sampling rho* needs the problem: pass problem= to Optimum.from_json",
                              field="problem")
        rng = np.random.default_rng(_seed_of(key_or_seed))
        spec = make_spec(self.problem, self.plus_fraction)
        n = int(n)
        if n < 1:
            raise ConfigError("number of samples must be positive", field="n", value=n)
        lam, tau = spec.lam, spec.tau
        if spec.output == "fixed":
            n_plus = choices.plus_count(spec.plus_fraction, n)
            signs = np.where(np.arange(n) < n_plus, 1.0, -1.0)
            w = np.empty((n, spec.p))
            for s in (1.0, -1.0):
                k = int(np.sum(signs == s))
                if k:
                    w[signs == s] = self._sample_w(spec, rng, k, group=s)
            return signs, w
        w = self._sample_w(spec, rng, n)
        g = spec.sigma(w @ spec.x.T) @ self.u / spec.n
        if spec.output == "trained":
            a = -g / lam + math.sqrt(tau / lam) * rng.standard_normal(n)
        else:
            _, _, _, (ag, ta) = gibbs.bounded_inner(spec, g)
            lw = -0.5 * lam / tau * ag[None, :] ** 2 - (spec.r_out / tau) * np.outer(g, ta)
            pr = np.exp(lw - logsumexp(lw, axis=1, keepdims=True))
            cum = np.cumsum(pr, axis=1)
            idx = np.minimum((cum < rng.random(n)[:, None]).sum(axis=1), ag.size - 1)
            ha = ag[1] - ag[0]
            a = ag[idx] + ha * (rng.random(n) - 0.5)
        return a, w

    def _sample_w(self, spec, rng, n, group=None):
        lam, tau = spec.lam, spec.tau
        if self.method == "closed_form":
            c = spec.x.T @ self.u / spec.n
            if spec.output == "fixed":
                return -group * c / lam + math.sqrt(tau / lam) * rng.standard_normal((n, spec.p))
            th = rng.multivariate_normal(np.zeros(spec.p + 1), self.cov, size=n)
            return th[:, 1:]
        if self.method == "quadrature":
            nodes = self._nodes()
        else:
            nodes = mc_nodes(spec, max(65536, 64 * n), int(rng.integers(2 ** 31)), self.u)
        g = nodes.matvec(spec, self.u) / spec.n
        comps, _, _ = gibbs.components(spec, g)
        if spec.output == "fixed":
            lc = next(c[1] for c in comps if c[2][0] == group)
        else:
            lc = comps[0][1]
        lw = nodes.logbase + lc
        pr = np.exp(lw - logsumexp(lw))
        idx = rng.choice(pr.size, size=n, p=pr / pr.sum())
        w = nodes.w[idx]
        if self.method == "quadrature":
            w = w + nodes.h * (rng.random(w.shape) - 0.5)
        return w

    def _nodes(self):
        if self.__dict__.get("_node_cache") is None:
            spec = make_spec(self.problem, self.plus_fraction)
            self.__dict__["_node_cache"], _ = Quadrature(spec, self.u).fixed(self.u)
        return self.__dict__["_node_cache"]

    # ---- JSON ----
    def to_dict(self) -> dict:
        """JSON-native and strict (non-finite numbers as the strings "nan", "inf", "-inf",
        which :meth:`from_json` reads back)."""
        return jsonable({
            "F_star": self.F_star, "F_star_err": self.F_star_err, "F_star_upper": self.F_star_upper,
            "method": self.method, "certified": self.method != "mc",
            "u": self.u.tolist(), "f": self.f.tolist(),
            "mean": self.mean.tolist(), "cov": self.cov.tolist(),
            "plus_fraction": self.plus_fraction, "info": self.info,
        }, nonfinite_as_str=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, problem=None) -> Optimum:
        d = json.loads(text)
        try:
            return cls(F_star=float(d["F_star"]), F_star_err=float(d["F_star_err"]),
                       F_star_upper=float(d["F_star_upper"]), u=np.asarray(d["u"], dtype=np.float64),
                       f=np.asarray(d["f"], dtype=np.float64), method=str(d["method"]),
                       mean=np.asarray(d["mean"], dtype=np.float64), cov=np.asarray(d["cov"], dtype=np.float64),
                       plus_fraction=float(d.get("plus_fraction", 0.5)), info=dict(d.get("info", {})),
                       problem=problem)
        except KeyError as e:
            raise ConfigError(f"optimum file lacks the field {e.args[0]!r}", field="optimum") from None


def _seed_of(key_or_seed):
    if isinstance(key_or_seed, (int, np.integer)):
        return int(key_or_seed)
    import jax  # a JAX key: derive a NumPy seed from its data

    data = np.asarray(jax.random.key_data(key_or_seed)).ravel()
    return [int(v) for v in data]


# ---------------------------------------------------------------------------------------
# Moments of rho_hat_u
# ---------------------------------------------------------------------------------------


def _moments_closed(spec, u):
    lam, tau, p = spec.lam, spec.tau, spec.p
    c = spec.x.T @ u / spec.n
    if spec.output == "trained":
        q = lam * lam - float(c @ c)
        cov = np.empty((p + 1, p + 1))
        cov[0, 0] = tau * lam / q
        cov[0, 1:] = cov[1:, 0] = -tau * c / q
        cov[1:, 1:] = tau * (np.eye(p) / lam + np.outer(c, c) / (lam * q))
        return np.zeros(p + 1), cov
    pis = [(spec.plus_fraction, 1.0), (1.0 - spec.plus_fraction, -1.0)]
    mean = sum(pi * (-s * c / lam) for pi, s in pis)
    second = sum(pi * np.outer(s * c / lam, s * c / lam) for pi, s in pis) + tau / lam * np.eye(p)
    return mean, second - np.outer(mean, mean)


def _moments_nodes(spec, nodes, u):
    g = nodes.matvec(spec, u) / spec.n
    comps, _, _ = gibbs.components(spec, g)
    w = nodes.w
    lam, tau = spec.lam, spec.tau
    if spec.output == "fixed":
        mean = np.zeros(spec.p)
        second = np.zeros((spec.p, spec.p))
        for pi_c, lc, _ in comps:
            lw = nodes.logbase + lc
            om = np.exp(lw - logsumexp(lw))
            mean += pi_c * (om @ w)
            second += pi_c * (w.T * om) @ w
        return mean, second - np.outer(mean, mean)
    lw = nodes.logbase + comps[0][1]
    om = np.exp(lw - logsumexp(lw))
    if spec.output == "trained":
        ea = -g / lam
        ea2 = ea * ea + tau / lam
    else:
        _, _, _, (ag, ta) = gibbs.bounded_inner(spec, g)
        lwa = -0.5 * lam / tau * ag[None, :] ** 2 - (spec.r_out / tau) * np.outer(g, ta)
        pa = np.exp(lwa - logsumexp(lwa, axis=1, keepdims=True))
        ea, ea2 = pa @ ag, pa @ (ag * ag)
    th = np.concatenate([ea[:, None], w], axis=1)
    mean = om @ th
    second = (th.T * om) @ th
    second[0, 0] = om @ ea2
    return mean, second - np.outer(mean, mean)


# ---------------------------------------------------------------------------------------
# solve_optimum
# ---------------------------------------------------------------------------------------


def _feasible_start(spec, method, n_samples, seed, halvings: int = 40):
    """u = 0 (squared loss: Z(0) is a Gaussian integral, always finite) or the largest of
    u = -2^-k y / 2, k = 0..halvings, with D(u) finite (logistic: u = l'(0, y) = -y/2 can be
    infeasible). Raises :class:`TheoryNotApplicable` when none is."""
    if spec.loss == "squared":
        return np.zeros(spec.n)
    scale = 0.5
    for _ in range(halvings + 1):
        u0 = -scale * spec.y
        if np.isfinite(gibbs.evaluate_spec(spec, u0, method, min(n_samples, 8192), seed).D):
            return u0
        scale *= 0.5
    raise TheoryNotApplicable(
        f"the dual D(u) is -inf at u = -s y for every s down to {2 * scale:.3g} (the Gibbs integral "
        "diverges): no feasible starting point for the dual maximisation")


def _solve_closed(spec, u0, info, solver):
    u, ev, sinfo = maximise_dual(spec, lambda v: closed_form(spec, v), u0, **solver)
    mean, cov = _moments_closed(spec, u)
    info.update(sinfo)
    return u, ev, max(ev.F - ev.D, 0.0), mean, cov


def _solve_quadrature(spec, u, info, solver, memory_budget, work):
    """Maximise on a fixed grid, re-chosen at the maximiser until it is stable (<= 4 rounds)."""
    nodes = None
    for round_ in range(4):
        new_nodes, _ = Quadrature(spec, u, memory_budget=memory_budget, max_work=work).fixed(u)
        if nodes is not None and new_nodes.w.shape == nodes.w.shape and new_nodes.h == nodes.h:
            break
        nodes = new_nodes
        u, _, sinfo = maximise_dual(spec, lambda v, nd=nodes: evaluate_nodes(spec, nd, v), u, **solver)
        info.update(sinfo, rounds=round_ + 1)
    final = Quadrature(spec, u, memory_budget=memory_budget, max_work=work).evaluate(u)
    if "nodes_obj" not in final.info:
        exc = gibbs.QuadratureOverBudget if final.withheld == 6 else TheoryNotApplicable
        raise exc(final.reason or "the quadrature could not evaluate D at the maximiser")
    mean, cov = _moments_nodes(spec, final.info["nodes_obj"], u)
    info.update(nodes=int(final.info["nodes"]), h=float(final.info["h"]), radius=float(final.info["radius"]),
                quad_err=float(final.err_D))
    return u, final, max(final.F - final.D, 0.0) + final.err_D, mean, cov


def _solve_mc(spec, u, info, solver, *, tol, n_samples, max_samples, seed, memory_budget):
    """Maximise on a fixed adapted sample, doubled until F* is stable; evaluate on a fresh one."""
    cap = gibbs.mc_sample_cap(spec, memory_budget)
    M, max_samples = min(int(n_samples), cap), min(int(max_samples), cap)
    prev, history, level, sinfo = None, [], 0, {}
    while True:
        nodes = mc_nodes(spec, M, seed + 1000 * level, u)  # proposal adapted at the current u
        u, ev, sinfo = maximise_dual(spec, lambda v, nd=nodes: evaluate_nodes(spec, nd, v), u, **solver)
        ev = evaluate_nodes(spec, nodes, u, stats=True)
        history.append((M, ev.D, ev.se_D))
        if prev is not None and abs(ev.D - prev.D) <= max(tol, 2 * math.hypot(ev.se_D, prev.se_D)):
            break
        if 2 * M > max_samples:
            break
        prev, M, level = ev, M * 2, level + 1
    fresh = mc_nodes(spec, M, seed + 7_777_777, u)
    final = evaluate_nodes(spec, fresh, u, stats=True)
    mean, cov = _moments_nodes(spec, fresh, u)
    info.update(sinfo, samples=M, ess=float(final.ess), se=float(final.se_D), pareto_k=float(final.pareto_k),
                ess_low=bool(final.ess_low), sample_history=[list(h) for h in history],
                proposal=fresh.proposal.as_dict())
    return u, final, max(final.F - final.D, 0.0) + 2 * final.se_D, mean, cov


def solve_optimum(problem, *, tol: float = 1e-6, method: str = "auto", n_samples: int = 65536,
                  max_samples: int = 2 ** 20, seed: int = 0, plus_fraction: float = 0.5,
                  gtol: float = 1e-11, maxiter: int = 5000, memory_budget: int | None = None) -> Optimum:
    """Maximise the dual D(u) over u in R^n: F*, f*, u* and a sampler for rho*.

    ``tol``: the Monte Carlo sample is doubled until F* changes by less than max(tol, 2 SE)
    (up to ``max_samples``, and at most what the memory budget holds); a warning-level note is
    put in ``info`` if the final error exceeds ``tol`` (``warning``) or, with Monte Carlo, if
    the importance weights at u* degenerate (``mc_warning``: ESS below
    :func:`mfld.duality.ess_threshold` or Pareto k_hat above 0.7; ``info`` also has ``ess``
    and ``pareto_k``). ``gtol``: max-norm of grad D at the maximiser; ``maxiter``: L-BFGS
    iterations per round (a solve stopped early still reports an honest ``F_star_err``: the
    duality gap at its u plus the integration error). ``method`` as in
    :func:`mfld.duality.certify`; ``auto`` falls back from quadrature to Monte Carlo (with a
    proposal adapted at each round's u) when the quadrature grid does not fit the memory
    budget (``info["fallback"]`` says why). Refuses tau = 0 and NTK scaling.
    """
    spec = make_spec(problem, plus_fraction)
    m = gibbs.choose_method(spec, method)
    info: dict = {"method": m}
    work = gibbs.QUAD_AUTO_WORK if method == "auto" else gibbs.QUAD_MAX_WORK
    if m == "quadrature":
        quad = Quadrature(spec, np.zeros(spec.n), memory_budget=memory_budget, max_work=work)
        if quad.unresolved is not None and quad.unresolved[0] == 6 and method == "auto":
            info["fallback"] = quad.unresolved[1] + "; Monte Carlo with an adapted proposal used instead"
            m = info["method"] = "mc"
    u0 = _feasible_start(spec, m, n_samples, seed)
    solver = dict(gtol=gtol, maxiter=maxiter)
    if m == "closed_form":
        u, final, err, mean, cov = _solve_closed(spec, u0, info, solver)
    elif m == "quadrature":
        try:
            u, final, err, mean, cov = _solve_quadrature(spec, u0, info, solver, memory_budget, work)
        except gibbs.QuadratureOverBudget as exc:
            if method != "auto":
                raise
            info["fallback"] = f"{exc}; Monte Carlo with an adapted proposal used instead"
            m = info["method"] = "mc"
    if m == "mc":
        mc = dict(tol=tol, n_samples=n_samples, max_samples=max_samples, seed=seed, memory_budget=memory_budget)
        u, final, err, mean, cov = _solve_mc(spec, u0, info, solver, **mc)
    info["gap"] = float(final.F - final.D)
    info["grad_max"] = float(np.max(np.abs(final.grad)))
    if err > tol:
        info["warning"] = f"F* is known only to +-{err:.2g}, above the requested tolerance {tol:g}"
    if m == "mc" and final.withheld:
        info["mc_warning"] = (f"the Monte Carlo importance weights at u* degenerated (ESS {final.ess:.3g} of "
                              f"{final.n_samples}, Pareto k_hat {final.pareto_k:.2g}; k > 0.5: infinite variance): "
                              "F_star_err is not a reliable error bar")
    return Optimum(F_star=float(final.D), F_star_err=float(err), F_star_upper=float(final.upper), u=u,
                   f=final.f_hat.copy(),
                   method=m, mean=mean, cov=cov, plus_fraction=spec.plus_fraction, info=info,
                   problem=problem)
