"""``lazy-vs-mean-field``: Ghorbani, Mei, Misiakiewicz, Montanari (NeurIPS 2019), "Limitations of
lazy training of two-layers neural networks", quadratic-target experiment scaled to d = 60.

Data: x ~ N(0, I_d), y = (sum_j gamma_j x_j^2 - sum_j gamma_j) / sqrt(d) = x^T B x - tr B with
B = diag(gamma) / sqrt(d) and gamma = ``np.random.default_rng(100).exponential(size=d)`` (drawn
once); a fresh minibatch of 100 at every step (online SGD, no sample is seen twice).
R_0 = Var(y) = 2 ||B||_F^2.

Three models with the quadratic activation sigma(z) = z^2 and the same first-layer draw
w_i ~ N(0, I/d) for a given seed, each with a trained output bias c (initialised at 0):

- **NN** (mean field): f(x) = (a/N) sum_i (w_i . x)^2 + c, the w_i trained, one shared trained
  scalar a initialised at 0. Mean-field learning rate: w_i moves by eta N dL/dw_i, a and c by
  eta dL/da, eta dL/dc.
- **NT** (neural tangent, the network f(x) = (1/sqrt N) sum_i a_i (w_i . x)^2 linearised at its
  initialisation, a_i ~ N(0, 1) fixed): f(x) = c + (1/sqrt N) sum_i a_i [(w_i . x)^2 +
  2 (w_i . x)(b_i . x)], the displacements b_i (initialised at 0) trained with step eta.
- **RF** (random features, first layer frozen): f(x) = c + (1/sqrt N) sum_i a_i (w_i . x)^2, the
  a_i (initialised at the same N(0, 1) draw as NT's) trained with step eta.

Loss (1/2)(f - y)^2 averaged over the minibatch; plain SGD with batch 100, tau = 0, lam = 0 (no
noise, no weight decay: this is not MFLD, and mfld's Problem -- which needs lam > 0 -- is not
used); eta tuned once per model at N = 30 (the smallest final population risk over a grid, seed 0)
and then frozen for every N; constant for the first 70% of the steps, then decayed geometrically
by a factor 10 over the last 30%. Test risk R on 20,000 fresh samples (with its Monte Carlo
standard error), reported as R/R_0.

Closed forms (float64). Every model is a quadratic form f(x) = x^T A x + c, and for symmetric M
and x ~ N(0, I), E[x^T M x] = tr M and Var[x^T M x] = 2 ||M||_F^2, so

    E (f - y)^2 = 2 ||A - B||_F^2 + (tr A + c)^2                                   (1)

(:func:`quadratic_risk`); the best c is -tr A and the optimum of a class is 2 min ||A - B||_F^2
over its set of matrices A:

- NN: A = (a/N) W^T W ranges over the rank-<= N symmetric matrices that are PSD or NSD; B is PSD,
  so the optimum keeps the N largest gamma_j (Eckart-Young): R*_NN/R_0 = sum_{j > N} gamma_(j)^2 /
  sum_j gamma_j^2 (gamma sorted decreasingly), 0 for N >= d (:func:`nn_optimum`).
- NT: A = A_0 + (1/sqrt N)(W^T D b + b^T D W) (D = diag(a), all a_i != 0, A_0 = N^-1/2 W^T D W)
  ranges over {A symmetric : Q A Q = 0}, Q the projector onto the orthogonal complement of the
  span of the w_i (A_0 is in that set; for quadratic sigma the set does not depend on a). The
  projection of B is B - Q B Q, so R*_NT/R_0 = ||Q B Q||_F^2 / ||B||_F^2 (:func:`nt_optimum`,
  0 for N >= d). Over the Gaussian draw of W the span is uniform, and with k = d - N and the
  Weingarten moments of a uniform rank-k projection, E[Q_ij Q_kl] = c1 d_ij d_kl + c2 (d_ik d_jl
  + d_il d_jk), c2 = k (d - k) / (d (d - 1)(d + 2)), c1 = k/d - (d + 1) c2:
  E ||Q B Q||_F^2 = (c1 + c2) ||B||_F^2 + c2 (tr B)^2 (:func:`nt_expected_optimum`, exact).
- RF: A = sum_i alpha_i w_i w_i^T; the normal equations are G alpha = h with G_ik = (w_i . w_k)^2
  and h_i = w_i^T B w_i, and R*_RF/R_0 = 1 - h^T alpha / ||B||_F^2 (:func:`rf_optimum`). Its
  average over W has no closed form here: :func:`rf_expected_optimum` averages it over a
  documented number of independent draws (with the standard error).

These are the infinite-data, infinite-time optima of each class. The experiment also reports the
*finite-time* reference: full-batch gradient descent on the population risk (1) with the same
eta, schedule, step count and initialisation (the SGD's noiseless, infinite-batch limit;
:func:`population_gd`), which separates a gap due to the training time (slow directions of a
class) from one due to the SGD noise.
"""

from __future__ import annotations

import math

import numpy as np

from mfld.experiments import _common as C

NAME = "lazy-vs-mean-field"
MODELS = ("NN", "NT", "RF")
BATCH = 100
GAMMA_SEED = 100
DECAY_FRACTION = 0.3  # the last 30% of the steps
DECAY_FACTOR = 10.0
TUNE_N = 30
TEST_SAMPLES = 20_000


# ---------------------------------------------------------------------------------------
# The target and closed forms
# ---------------------------------------------------------------------------------------


def gammas(d: int, seed: int = GAMMA_SEED) -> np.ndarray:
    """gamma = ``np.random.default_rng(seed).exponential(size=d)`` (the target's spectrum)."""
    return np.random.default_rng(seed).exponential(size=int(d))


def target_diag(gamma) -> np.ndarray:
    """The diagonal of B = diag(gamma)/sqrt(d)."""
    gamma = np.asarray(gamma, np.float64)
    return gamma / math.sqrt(gamma.size)


def r0(gamma) -> float:
    """R_0 = Var(y) = 2 ||B||_F^2."""
    b = target_diag(gamma)
    return float(2.0 * np.sum(b * b))


def target(x, gamma) -> np.ndarray:
    """y = x^T B x - tr B for the rows of x."""
    b = target_diag(gamma)
    return (np.asarray(x) ** 2) @ b - b.sum()


def quadratic_risk(A, c, gamma) -> float:
    """Exact E (x^T A x + c - y)^2 for x ~ N(0, I): 2 ||A_s - B||_F^2 + (tr A + c)^2 (A_s the
    symmetric part of A); +inf for non-finite parameters."""
    A = np.asarray(A, np.float64)
    c = float(c)
    if not (np.all(np.isfinite(A)) and math.isfinite(c)):
        return math.inf
    M = 0.5 * (A + A.T) - np.diag(target_diag(gamma))
    return float(2.0 * np.sum(M * M) + (np.trace(A) + c) ** 2)


def mc_risk(A, c, gamma, n: int = TEST_SAMPLES, seed: int = 0, block: int = 20_000) -> tuple[float, float]:
    """Monte Carlo test risk of x^T A x + c on ``n`` fresh samples: (mean squared error, its
    standard error)."""
    A = np.asarray(A, np.float64)
    d = A.shape[0]
    rng = np.random.default_rng([int(seed), 7771])
    s1 = s2 = 0.0
    done = 0
    while done < n:
        m = min(block, n - done)
        x = rng.standard_normal((m, d))
        e2 = (np.einsum("ij,jk,ik->i", x, A, x) + c - target(x, gamma)) ** 2
        s1 += float(e2.sum())
        s2 += float((e2 * e2).sum())
        done += m
    mean = s1 / n
    var = max(s2 / n - mean * mean, 0.0)
    return mean, math.sqrt(var / n)


def nn_optimum(gamma, n_neurons: int) -> float:
    """R*_NN / R_0: the best PSD rank-N quadratic fit keeps the N largest gamma_j."""
    s = np.sort(np.asarray(gamma, np.float64) ** 2)[::-1]
    return float(s[int(n_neurons):].sum() / s.sum())


def nn_optimal_fit(gamma, n_neurons: int) -> tuple[np.ndarray, float]:
    """(A*, c*) of the NN class: B restricted to its N largest entries, c* = -tr A*."""
    b = target_diag(gamma)
    keep = np.argsort(-b, kind="stable")[: int(n_neurons)]
    A = np.zeros((b.size, b.size))
    A[keep, keep] = b[keep]
    return A, -float(np.trace(A))


def _complement_projector(W) -> np.ndarray:
    """Q: the orthogonal projector onto the complement of the span of the rows of W."""
    W = np.asarray(W, np.float64)
    d = W.shape[1]
    _, s, vt = np.linalg.svd(W, full_matrices=True)
    r = int(np.sum(s > s.max() * d * np.finfo(np.float64).eps)) if s.size else 0
    v = vt[r:]
    return v.T @ v


def nt_optimal_fit(gamma, W) -> tuple[np.ndarray, float]:
    """(A*, c*) of the NT class of first-layer weights W: A* = B - Q B Q, c* = -tr A*."""
    B = np.diag(target_diag(gamma))
    Q = _complement_projector(W)
    A = B - Q @ B @ Q
    return A, -float(np.trace(A))


def nt_optimum(gamma, W) -> float:
    """R*_NT / R_0 = ||Q B Q||_F^2 / ||B||_F^2 for the first-layer weights W (rows w_i)."""
    B = np.diag(target_diag(gamma))
    Q = _complement_projector(W)
    QBQ = Q @ B @ Q
    return float(np.sum(QBQ * QBQ) / np.sum(B * B))


def nt_expected_optimum(gamma, n_neurons: int) -> float:
    """E_W R*_NT / R_0 for Gaussian W (N rows): exact, from the moments of a uniform rank-k
    projection, k = d - N (0 for N >= d)."""
    b = target_diag(gamma)
    d = b.size
    k = d - int(n_neurons)
    if k <= 0:
        return 0.0
    c2 = k * (d - k) / (d * (d - 1) * (d + 2))
    c1 = k / d - (d + 1) * c2
    fro2 = float(np.sum(b * b))
    return float(((c1 + c2) * fro2 + c2 * b.sum() ** 2) / fro2)


def _rf_solve(gamma, W):
    W = np.asarray(W, np.float64)
    b = target_diag(gamma)
    G = (W @ W.T) ** 2
    h = np.einsum("id,d,id->i", W, b, W)
    alpha = np.linalg.lstsq(G, h, rcond=None)[0]
    return alpha, h, b


def rf_optimal_fit(gamma, W) -> tuple[np.ndarray, float]:
    """(A*, c*) of the RF class of first-layer weights W: A* = sum_i alpha_i w_i w_i^T."""
    W = np.asarray(W, np.float64)
    alpha, _, _ = _rf_solve(gamma, W)
    A = W.T @ (alpha[:, None] * W)
    return A, -float(np.trace(A))


def rf_optimum(gamma, W) -> float:
    """R*_RF / R_0 = 1 - h^T G^+ h / ||B||_F^2 for the first-layer weights W."""
    alpha, h, b = _rf_solve(gamma, W)
    return float(max(1.0 - h @ alpha / np.sum(b * b), 0.0))


def draw_first_layer(d: int, n_neurons: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(W, a) of one seed: w_i ~ N(0, I/d) (rows of W) and a_i ~ N(0, 1), NumPy draws."""
    rng = np.random.default_rng([int(seed), int(n_neurons), 60606])
    W = rng.standard_normal((int(n_neurons), int(d))) / math.sqrt(d)
    a = rng.standard_normal(int(n_neurons))
    return W, a


def rf_expected_optimum(gamma, n_neurons: int, draws: int = 200, seed: int = 12345) -> tuple[float, float]:
    """E_W R*_RF / R_0 averaged over ``draws`` independent Gaussian W: (mean, standard error)."""
    d = np.asarray(gamma).size
    rng = np.random.default_rng([int(seed), int(n_neurons)])
    vals = np.array([rf_optimum(gamma, rng.standard_normal((int(n_neurons), d)) / math.sqrt(d))
                     for _ in range(int(draws))])
    return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(draws)) if draws > 1 else math.nan


def optimum(model: str, gamma, n_neurons: int, W=None) -> float:
    """The closed-form optimum R*/R_0 of ``model`` (NN needs no W)."""
    if model == "NN":
        return nn_optimum(gamma, n_neurons)
    if model == "NT":
        return nt_optimum(gamma, W)
    return rf_optimum(gamma, W)


# ---------------------------------------------------------------------------------------
# The three models (NumPy float64, analytic gradients: tiny problems, no compilation)
# ---------------------------------------------------------------------------------------


def init_model(model: str, gamma, n_neurons: int, seed: int):
    """(trained params, frozen params) of ``model`` at initialisation (see the module docstring)."""
    d = np.asarray(gamma).size
    W, a = draw_first_layer(d, n_neurons, seed)
    if model == "NN":
        return {"w": W, "a": 0.0, "c": 0.0}, {}
    if model == "NT":
        return {"b": np.zeros_like(W), "c": 0.0}, {"w": W, "a": a}
    if model == "RF":
        return {"a": a.copy(), "c": 0.0}, {"w": W}
    raise ValueError(f"unknown model {model!r}")


def predict(model: str, params, fixed, x) -> np.ndarray:
    """f(x) of ``model`` on the rows of x."""
    return _forward(model, params, fixed, x)[0]


def _forward(model, params, fixed, x):
    if model == "NN":
        z = x @ params["w"].T
        q = np.mean(z * z, axis=1)
        return params["a"] * q + params["c"], z, q
    z = x @ fixed["w"].T
    s = 1.0 / math.sqrt(fixed["w"].shape[0])
    if model == "NT":
        zb = x @ params["b"].T
        return params["c"] + s * ((z * z + 2.0 * z * zb) @ fixed["a"]), z, None
    return params["c"] + s * ((z * z) @ params["a"]), z, None


def batch_gradient(model: str, params, fixed, x, y) -> dict:
    """Gradient of the minibatch loss (1/2m) sum_j (f(x_j) - y_j)^2 in the trained parameters."""
    m = x.shape[0]
    f, z, q = _forward(model, params, fixed, x)
    r = (f - y) / m
    if model == "NN":
        n = params["w"].shape[0]
        return {"w": (2.0 * params["a"] / n) * ((z * r[:, None]).T @ x), "a": float(r @ q), "c": float(r.sum())}
    s = 1.0 / math.sqrt(fixed["w"].shape[0])
    if model == "NT":
        return {"b": (2.0 * s) * (fixed["a"][:, None] * ((z * r[:, None]).T @ x)), "c": float(r.sum())}
    return {"a": s * ((z * z).T @ r), "c": float(r.sum())}


def model_matrix(model: str, params, fixed) -> tuple[np.ndarray, float]:
    """(A, c) with f(x) = x^T A x + c."""
    if model == "NN":
        W = params["w"]
        return params["a"] * (W.T @ W) / W.shape[0], float(params["c"])
    W = fixed["w"]
    s = 1.0 / math.sqrt(W.shape[0])
    if model == "NT":
        M = W.T @ (fixed["a"][:, None] * params["b"])
        return s * (W.T @ (fixed["a"][:, None] * W) + M + M.T), float(params["c"])
    return s * (W.T @ (params["a"][:, None] * W)), float(params["c"])


def population_gradient(model: str, params, fixed, gamma) -> dict:
    """Gradient of the population loss (1/2) E (f - y)^2 = ||A - B||_F^2 + (tr A + c)^2 / 2: with
    G = 2 (A - B) + (tr A + c) I, dL/dw_i = (2a/N) G w_i (NN), dL/db_i = 2 a_i G w_i / sqrt N (NT),
    dL/da_i = w_i^T G w_i / sqrt N (RF), dL/dc = tr A + c."""
    A, c = model_matrix(model, params, fixed)
    G = 2.0 * (A - np.diag(target_diag(gamma)))
    e = float(np.trace(A) + c)
    G[np.diag_indices_from(G)] += e
    if model == "NN":
        W = params["w"]
        n = W.shape[0]
        return {"w": (2.0 * params["a"] / n) * (W @ G), "a": float(np.sum(G * (W.T @ W)) / n), "c": e}
    W = fixed["w"]
    s = 1.0 / math.sqrt(W.shape[0])
    WG = W @ G
    if model == "NT":
        return {"b": (2.0 * s) * (fixed["a"][:, None] * WG), "c": e}
    return {"a": s * np.sum(WG * W, axis=1), "c": e}


def one_blas_thread():
    """A context limiting NumPy's BLAS to one thread (threadpoolctl, shipped with scikit-learn;
    a no-op without it): the products here are ~100 x 100, and a multithreaded BLAS spends more
    time synchronising than computing (measured 30x slower on a loaded 2-core machine)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        import contextlib

        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def schedule(step, total) -> float:
    """eta_t / eta: 1 for the first 70% of the steps, then geometric decay to 1/10 at the end."""
    start = (1.0 - DECAY_FRACTION) * total
    frac = min(max((step - start) / (DECAY_FRACTION * total), 0.0), 1.0)
    return DECAY_FACTOR ** (-frac)


def train(model: str, gamma, n_neurons: int, eta: float, steps: int, seed: int = 0, *, n_records: int = 40,
          population: bool = False):
    """Train ``model`` for ``steps`` steps from its seeded initialisation; returns (params, fixed,
    curve), ``curve`` the exact population risk R/R_0 (:func:`quadratic_risk`) at the start and
    after each of ``n_records`` equal segments (``n_records + 1`` values). Online SGD (batch
    :data:`BATCH`, fresh Gaussian samples from a seeded stream), or with ``population=True``
    full-batch gradient descent on the population risk (the SGD's noiseless, infinite-batch
    limit). The NN's first layer moves by N eta times
    its gradient (mean-field learning rate); a diverged run stops with inf."""
    steps, n_records = int(steps), int(n_records)
    if steps % n_records:
        raise ValueError("steps must be a multiple of n_records")
    seg = steps // n_records
    params, fixed = init_model(model, gamma, n_neurons, seed)
    b = target_diag(gamma)
    d = b.size
    mult = {k: (float(n_neurons) if (model == "NN" and k == "w") else 1.0) for k in params}
    rng = np.random.default_rng([int(seed), int(n_neurons), 31337])
    R0 = r0(gamma)
    curve = [quadratic_risk(*model_matrix(model, params, fixed), gamma) / R0]
    step = 0
    with np.errstate(over="ignore", invalid="ignore"), one_blas_thread():
        for _ in range(n_records):
            for _ in range(seg):
                if population:
                    g = population_gradient(model, params, fixed, gamma)
                else:
                    x = rng.standard_normal((BATCH, d))
                    g = batch_gradient(model, params, fixed, x, (x * x) @ b - b.sum())
                lr = eta * schedule(step, steps)
                params = {k: params[k] - (lr * mult[k]) * g[k] for k in params}
                step += 1
            risk = quadratic_risk(*model_matrix(model, params, fixed), gamma) / R0
            curve.append(risk)
            if not math.isfinite(risk) or risk > 1e6:  # diverged
                curve += [math.inf] * (n_records + 1 - len(curve))
                break
    return params, fixed, np.asarray(curve)


def population_gd(model: str, gamma, n_neurons: int, eta: float, steps: int, seed: int = 0, n_records: int = 40):
    """The curve R/R_0 of full-batch gradient descent on the population risk, same init, eta,
    schedule and steps as :func:`train`."""
    return train(model, gamma, n_neurons, eta, steps, seed, n_records=n_records, population=True)[2]


# ---------------------------------------------------------------------------------------
# The experiment
# ---------------------------------------------------------------------------------------


def _settings(quick: bool) -> dict:
    if quick:
        return dict(d=20, Ns=[4, 10, 40], steps=2000, seeds=[0], n_records=20, tune_N=10,
                    etas={"NN": [0.01, 0.03], "NT": [0.03, 0.1], "RF": [0.03, 0.1]},
                    rf_draws=40, test_samples=TEST_SAMPLES)
    grid = [0.003, 0.01, 0.03, 0.1, 0.3]
    return dict(d=60, Ns=[8, 15, 30, 45, 60, 120], steps=30_000, seeds=[0, 1], n_records=40, tune_N=TUNE_N,
                etas={m: grid for m in MODELS}, rf_draws=200, test_samples=TEST_SAMPLES)


def tolerance(opt: float) -> float:
    """The acceptance band: max(0.03, 15% of the optimum)."""
    return max(0.03, 0.15 * opt)


def run(out_dir, quick: bool = False) -> dict:
    return C.run_stages(compute, plot, report, out_dir, quick)


def compute(quick: bool = False) -> dict:
    """Learning rates tuned once, then every (model, N, seed) trained: ``rows``, ``curves``,
    ``tune``, the closed-form optima (``expected``, ``dense``), the per-(model, N) ``summ``
    and the ordering RF > NT > NN below N = d."""
    S = _settings(quick)
    d, Ns, steps, seeds, nrec = S["d"], S["Ns"], S["steps"], S["seeds"], S["n_records"]
    gamma = gammas(d)
    R0 = r0(gamma)
    rec_steps = [r * (steps // nrec) for r in range(nrec + 1)]

    # ---- learning rates: tuned once per model at N = tune_N (seed 0), then frozen
    tune = {k: [] for k in ("model", "eta", "final_R_over_R0")}
    eta_of, tuned_runs = {}, {}
    for m in MODELS:
        best = (math.inf, None)
        for eta in S["etas"][m]:
            params, fixed, curve = train(m, gamma, S["tune_N"], eta, steps, seed=seeds[0], n_records=nrec)
            fin = float(curve[-1])
            C.append_row(tune, model=m, eta=eta, final_R_over_R0=fin)
            if fin < best[0]:
                best = (fin, eta)
                tuned_runs[m] = (params, fixed, curve)
        eta_of[m] = best[1]

    # ---- the runs
    rows = {k: [] for k in ("model", "N", "seed", "eta", "R_over_R0", "mc_se", "population_R_over_R0",
                            "optimum_this_W", "popgd_at_T")}
    curves = {k: [] for k in ("model", "N", "seed", "step", "sgd_R_over_R0", "popgd_R_over_R0")}
    for m in C.stages(MODELS, "models"):
        for N in Ns:
            for seed in seeds:
                if N == S["tune_N"] and seed == seeds[0]:
                    params, fixed, curve = tuned_runs[m]
                else:
                    params, fixed, curve = train(m, gamma, N, eta_of[m], steps, seed=seed, n_records=nrec)
                pcurve = population_gd(m, gamma, N, eta_of[m], steps, seed=seed, n_records=nrec)
                A, c = model_matrix(m, params, fixed)
                mc, se = mc_risk(A, c, gamma, S["test_samples"], seed=10_000 + 97 * N + seed)
                W = draw_first_layer(d, N, seed)[0]
                C.append_row(rows, model=m, N=N, seed=seed, eta=eta_of[m], R_over_R0=mc / R0, mc_se=se / R0,
                             population_R_over_R0=float(curve[-1]), optimum_this_W=optimum(m, gamma, N, W),
                             popgd_at_T=float(pcurve[-1]))
                C.append_rows(curves, model=m, N=N, seed=seed, step=rec_steps, sgd_R_over_R0=list(curve),
                              popgd_R_over_R0=list(pcurve))

    # ---- expected optima over W (NT exact, RF Monte Carlo over draws)
    expected = {k: [] for k in ("N", "NN", "NT", "RF", "RF_se")}
    for N in Ns:
        rf, rf_se = rf_expected_optimum(gamma, N, S["rf_draws"])
        C.append_row(expected, N=N, NN=nn_optimum(gamma, N), NT=nt_expected_optimum(gamma, N), RF=rf, RF_se=rf_se)
    curve_N = sorted(set(np.unique(np.geomspace(2, 2.2 * d, 24).astype(int)).tolist()) | set(Ns))
    dense = {k: [] for k in ("N", "NN", "NT", "RF")}
    for N in curve_N:
        C.append_row(dense, N=N, NN=nn_optimum(gamma, N), NT=nt_expected_optimum(gamma, N),
                     RF=rf_expected_optimum(gamma, N, max(10, S["rf_draws"] // 5))[0])

    # ---- summary per (model, N)
    summ = {k: [] for k in ("model", "N", "R_over_R0", "spread", "optimum", "expected_optimum", "popgd_at_T",
                            "tolerance", "within", "gap_time", "gap_sgd")}
    for m in MODELS:
        for N in Ns:
            sel = [i for i in range(len(rows["N"])) if rows["model"][i] == m and rows["N"][i] == N]
            meas = float(np.mean([rows["R_over_R0"][i] for i in sel]))
            spread = float(np.ptp([rows["R_over_R0"][i] for i in sel])) if len(sel) > 1 else 0.0
            opt = float(np.mean([rows["optimum_this_W"][i] for i in sel]))
            pgd = float(np.mean([rows["popgd_at_T"][i] for i in sel]))
            tol = tolerance(opt)
            j = expected["N"].index(N)
            # the gap measured - optimum = (popgd - optimum): the finite training time, seen by the
            # noiseless infinite-batch descent, + (measured - popgd): the SGD noise and the test sample
            C.append_row(summ, model=m, N=N, R_over_R0=meas, spread=spread, optimum=opt,
                         expected_optimum=float(expected[m][j]), popgd_at_T=pgd, tolerance=tol,
                         within=bool(abs(meas - opt) <= tol), gap_time=pgd - opt, gap_sgd=meas - pgd)

    def val(m, N):
        return next(summ["R_over_R0"][i] for i in range(len(summ["N"])) if summ["model"][i] == m and summ["N"][i] == N)

    rf_floor = 1.0 - float(np.sum(target_diag(gamma)) ** 2 / (d * np.sum(target_diag(gamma) ** 2)))
    ordering = {int(N): bool(val("RF", N) > val("NT", N) > val("NN", N)) for N in Ns if N < d}
    return dict(quick=quick, settings=S, d=d, R0=R0, rf_floor=rf_floor, eta_of=eta_of, tune=tune, rows=rows,
                curves=curves, expected=expected, dense=dense, summ=summ, ordering=ordering)


def plot(res: dict, out) -> None:
    """``lazy_vs_mean_field.png`` (R/R_0 against N, the learning-rate tuning) and
    ``training_curves.png``."""
    _figures(out, res["settings"], res["summ"], res["dense"], res["curves"], res["tune"], res["eta_of"], res["d"])


def report(res: dict, out, *, wall: float) -> dict:
    """The CSV tables, ``report.md`` and ``summary.json``; returns the summary."""
    S, d, R0, rf_floor, eta_of, quick = (res[k] for k in ("settings", "d", "R0", "rf_floor", "eta_of", "quick"))
    tune, summ, ordering, expected = res["tune"], res["summ"], res["ordering"], res["expected"]
    Ns, steps, seeds = S["Ns"], S["steps"], S["seeds"]
    C.write_csv(out / "runs.csv", res["rows"])
    C.write_csv(out / "summary_table.csv", summ)
    C.write_csv(out / "training_curves.csv", res["curves"])
    C.write_csv(out / "lr_tuning.csv", tune)
    C.write_csv(out / "expected_optima.csv", res["dense"])

    n_in = sum(summ["within"])
    outside = [i for i in range(len(summ["N"])) if not summ["within"][i]]
    reading = [f"{n_in} of {len(summ['N'])} (model, N) pairs are within max(0.03, 15%) of their class's "
               f"closed-form optimum."]
    if outside:
        reading.append("Outside the band, with the gap split into its finite-time part (population GD at the same "
                       "steps minus the optimum: the slow directions of the class, no noise involved) and its "
                       "SGD part (measured minus population GD: minibatch noise, and the test sample's "
                       "error): " + "; ".join(
                           f"{summ['model'][i]} N={summ['N'][i]}: {summ['R_over_R0'][i]:.4f} against "
                           f"{summ['optimum'][i]:.4f} (band {summ['tolerance'][i]:.3f}) = "
                           f"{summ['gap_time'][i]:+.4f} time {summ['gap_sgd'][i]:+.4f} SGD" for i in outside) + ".")
    reading.append("Ordering RF > NT > NN of the measured R/R_0 at every N < d: "
                   + ("holds" if all(ordering.values()) else "FAILS at N = "
                      + ", ".join(str(k) for k, v in ordering.items() if not v)) + ".")
    rf_min = min(summ["R_over_R0"][i] for i in range(len(summ["N"])) if summ["model"][i] == "RF")
    reading.append(f"RF stays at R/R_0 >= {rf_min:.3f} at every width (bounded away from 0); NN and NT at N >= d: "
                   + ", ".join(f"{summ['model'][i]} N={summ['N'][i]}: {summ['R_over_R0'][i]:.4f}"
                               for i in range(len(summ["N"])) if summ["N"][i] >= d and summ["model"][i] != "RF")
                   + ".")
    return C.finish(out, NAME, "Lazy training against mean field (Ghorbani, Mei, Misiakiewicz, Montanari 2019)", [
        ("Setting", f"d = {d}, x ~ N(0, I_d), y = (sum_j gamma_j x_j^2 - sum_j gamma_j)/sqrt(d) with gamma = "
                    f"np.random.default_rng({GAMMA_SEED}).exponential(size={d}); R_0 = Var(y) = {R0:.4f}. "
                    f"sigma(z) = z^2 (registered activation `quadratic`). Widths N in {Ns}; online SGD, batch "
                    f"{BATCH}, fresh samples every step, {steps} steps ({steps * BATCH:,} samples), tau = 0, "
                    f"lam = 0; eta tuned per model at N = {S['tune_N']} (seed {seeds[0]}) over "
                    f"{S['etas']['NN'] if len(set(map(tuple, S['etas'].values()))) == 1 else S['etas']} and "
                    f"frozen: NN {eta_of['NN']:g}, NT {eta_of['NT']:g}, RF {eta_of['RF']:g}; constant for 70% "
                    f"of the steps, then a geometric tenfold decay. Seeds {seeds} (the seed draws W, a and the "
                    f"data stream). Test risk on {S['test_samples']:,} fresh samples. "
                    f"{'Quick' if quick else 'Full'} setting; wall time {wall:.0f} s."),
        ("Models", "NN: f = (a/N) sum_i (w_i.x)^2 + c (w_i, shared scalar a from 0, and c trained; mean-field "
                   "learning rate N eta on w_i). NT: f = c + N^-1/2 sum_i a_i [(w_i.x)^2 + 2 (w_i.x)(b_i.x)], "
                   "a_i ~ N(0,1) fixed, b_i from 0 trained. RF: f = c + N^-1/2 sum_i a_i (w_i.x)^2, a_i from the "
                   "same N(0,1) draw trained, w_i frozen. w_i ~ N(0, I/d) for all three (same draw per seed)."),
        ("Closed-form optima", "E(f - y)^2 = 2||A - B||_F^2 + (tr A + c)^2 for f = x^T A x + c, B = diag(gamma)"
                               "/sqrt(d). NN: sum_{j>N} gamma_(j)^2 / sum gamma^2 (best PSD rank-N fit). NT: "
                               "||Q B Q||_F^2/||B||_F^2 with Q the projector onto span(w_i)^perp; its mean over "
                               "W is exact (Weingarten moments of a uniform projection). RF: 1 - h^T G^+ h/||B||^2, "
                               "G = ((w_i.w_k)^2), h_i = w_i^T B w_i; its mean over W over "
                               f"{S['rf_draws']} draws. `optimum` is the optimum for the run's own W (mean over "
                               "seeds), `expected_optimum` the mean over W. `popgd_at_T`: full-batch gradient "
                               "descent on the population risk with the same init, eta, schedule and steps."),
        ("Results (R/R_0; mean over seeds, `spread` = max - min)", C.md_table(summ)),
        ("Learning-rate tuning", C.md_table(tune)),
        ("What the theory predicts", "Ghorbani et al. (2019). RF: bounded away from 0 for N < d, and in fact "
                                     "for every N much below d^2: its span has dimension N in the d(d+1)/2 "
                                     "dimensions of quadratic forms, and in their regime d^(1+delta) <= N <= "
                                     "d^(2-delta) it captures only the trace part of B, R_RF/R_0 -> 1 - (tr B)^2 "
                                     f"/ (d ||B||_F^2) = {rf_floor:.3f} here (for N < d even that part only "
                                     "partly: a span of N < d rank-one matrices misses the identity by at least "
                                     "d - N). NT: reaches 0 exactly at N >= d (its span is every quadratic form "
                                     "once the w_i span R^d); below, the exact mean over W above (about "
                                     "(1 - N/d)^2 for large d). NN: 0 from N >= d, and below NT for N < d (it "
                                     "selects the top-N directions of B; NT projects onto a random N-dimensional "
                                     "subspace). Hence RF > NT > NN for N < d. What it does not predict: how "
                                     "long plain SGD takes to approach each optimum. The NT tangent space is "
                                     "ill-conditioned -- the fixed a_i ~ N(0, 1) scale the neurons' steps by "
                                     "a_i^2, and W W^T is nearly singular for N close to d -- which the "
                                     "population-GD reference measures."),
        ("Reading", " ".join(reading)),
    ], quick=quick, wall=wall,
        files=["lazy_vs_mean_field.png", "training_curves.png", "runs.csv", "summary_table.csv",
               "training_curves.csv", "lr_tuning.csv", "expected_optima.csv"],
        d=d, R0=R0, eta=eta_of, ordering=ordering, table=summ, expected=expected)


def _figures(out, S, summ, dense, curves, tune, eta_of, d):
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(14, 6.2), gridspec_kw={"width_ratios": [1.5, 1]})
    ax = axes[0]
    for j, m in enumerate(MODELS):
        col = f"C{j}"
        ax.plot(dense["N"], dense[m], "-", color=col, lw=1.2, label=f"{m}: closed-form optimum (mean over W)")
        sel = [i for i in range(len(summ["N"])) if summ["model"][i] == m]
        N = [summ["N"][i] for i in sel]
        ax.plot(N, [summ["R_over_R0"][i] for i in sel], "o", color=col, ms=6, label=f"{m}: SGD, test risk")
        ax.plot(N, [summ["optimum"][i] for i in sel], "x", color=col, ms=6, label=f"{m}: optimum for the run's W")
        ax.plot(N, [summ["popgd_at_T"][i] for i in sel], "s", mfc="none", color=col, ms=7,
                label=f"{m}: population GD, same steps")
    ax.axvline(d, color="0.6", ls=":", lw=0.8)
    ax.set_xscale("log")
    C.no_minor_labels(ax)
    ax.set_xticks(S["Ns"])
    ax.set_xticklabels([str(n) for n in S["Ns"]])
    ax.set_xlabel("width N")
    ax.set_ylabel("R / R_0")
    ax.set_ylim(-0.03, 1.05)
    ax.set_title(f"quadratic target, d = {d}: RF > NT > NN below N = d (dotted line: N = d)", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3)
    ax = axes[1]
    for j, m in enumerate(MODELS):
        sel = [i for i in range(len(tune["eta"])) if tune["model"][i] == m]
        ax.loglog([tune["eta"][i] for i in sel], [max(min(tune["final_R_over_R0"][i], 10.0), 1e-4) for i in sel],
                  "o-", color=f"C{j}", label=f"{m} (chosen eta = {eta_of[m]:g})")
    ax.set_xlabel("eta")
    ax.set_ylabel(f"final R / R_0 at N = {S['tune_N']} (capped at 10)")
    ax.set_title("learning-rate tuning (once, then frozen)", fontsize=9)
    ax.legend(fontsize=7)
    C.savefig(fig, out / "lazy_vs_mean_field.png")

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), sharey=True)
    Ns = S["Ns"]
    cmap = plt.get_cmap("viridis")
    for ax, m in zip(axes, MODELS, strict=True):
        for k, N in enumerate(Ns):
            col = cmap(k / max(len(Ns) - 1, 1))
            sel = [i for i in range(len(curves["step"])) if curves["model"][i] == m and curves["N"][i] == N
                   and curves["seed"][i] == S["seeds"][0]]
            st = [curves["step"][i] for i in sel]
            ax.plot(st, [max(curves["sgd_R_over_R0"][i], 1e-5) for i in sel], "-", color=col, label=f"N = {N}")
            ax.plot(st, [max(curves["popgd_R_over_R0"][i], 1e-5) for i in sel], "--", color=col, lw=0.8)
            j = [i for i in range(len(summ["N"])) if summ["model"][i] == m and summ["N"][i] == N][0]
            ax.axhline(max(summ["optimum"][j], 1e-5), color=col, ls=":", lw=0.8)
        ax.axvline((1 - DECAY_FRACTION) * S["steps"], color="0.7", lw=0.6)
        ax.set_yscale("log")
        ax.set_xlabel("SGD step")
        ax.set_title(f"{m}: SGD (solid), population GD (dashed), optimum (dotted; 0 drawn at 1e-5)", fontsize=8)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"population R / R_0 (seed {S['seeds'][0]})")
    C.savefig(fig, out / "training_curves.png")
