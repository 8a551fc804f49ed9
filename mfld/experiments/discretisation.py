"""``discretisation``: the error against the number of particles N and against the step eta,
with fitted slopes and 95% intervals (THEORY section 3).

Task: the linear case (sigma(z) = z, squared loss, d = 1 without bias), where rho* and the
N = infinity law of the plain scheme at each eta are known exactly (mfld.reference).

- Against N (expected slope -1): at fixed eta, time averages at stationarity, over
  ``n_seeds`` >= 8 seeds, of (i) the dual gap F* - D(u(rho_N)) with D in closed form and
  (ii) the risk's excess over the exact N = infinity stationary predictor of the scheme at the
  same eta (so the eta bias does not flatten the slope), in its quadratic part
  (1/2n)|f_N - f_inf|^2 = R(f_N) - R(f_inf) - <u_inf, f_N - f_inf>/n (squared loss). The raw
  excess R(f_N) - R(f_inf) is reported too, but not fitted: its first-order term has
  O(N^-1/2) fluctuations that swamp its O(1/N) mean at the sample sizes used here.
- Against eta: from the exact N = infinity covariance recursion iterated to its fixed point
  (no particle noise): the variance error |Var_eta(a) - Var*(a)| (expected slope +1) and the
  free-energy error F(rho_eta) - F* (expected slope +2); checked against particle runs
  (N = 4000, time-averaged Var(a)) at two step sizes. The k-NN entropy is too noisy (~1e-2
  nats) for these fits, so it is not used.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from mfld import dynamics, loop, network, reference
from mfld.experiments import _common as C
from mfld.problem import Problem

NAME = "discretisation"


def _settings(quick: bool):
    if quick:
        return dict(Ns=[16, 64, 256], n_seeds=2, eta=0.05, burn=100, avg=300, every=4,
                    etas=[0.2, 0.1, 0.05, 0.025], check_etas=[0.1], check_N=1000, check_steps=(200, 400))
    return dict(Ns=[16, 32, 64, 128, 256, 512], n_seeds=8, eta=0.05, burn=400, avg=4000, every=5,
                etas=[0.2, 0.1, 0.05, 0.025, 0.0125], check_etas=[0.2, 0.05], check_N=4000,
                check_steps=(400, 4000))


def _data(n=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, (n, 1))
    return x, 0.6 * x[:, 0] + 0.1 * rng.standard_normal(n)


def _dual_closed(pb, f):
    """D(u) at u = f - y, linear activation (THEORY 7 log Z), in JAX (float64 scope)."""
    u = f - pb.y
    c = jnp.mean(u[:, None] * pb.x, axis=0)
    lam, tau = pb.lam, pb.tau
    q = lam * lam - jnp.sum(c * c)
    p = pb.x.shape[1]
    log_z = 0.5 * (p + 1) * jnp.log(2 * jnp.pi * tau) - 0.5 * (p - 1) * jnp.log(lam) - 0.5 * jnp.log(q)
    return jnp.where(q > 0, -jnp.mean(0.5 * u * u + u * pb.y) - tau * log_z, -jnp.inf)


def _init(pb, n_particles, seed):
    """a, w ~ N(0, 1) i.i.d. from NumPy (no per-shape compilation), the dynamics key of ``seed``."""
    rng = np.random.default_rng([int(seed), 2718])
    _, key = dynamics.dynamics_keys(seed)
    return dynamics.ParticleState(jnp.asarray(rng.standard_normal(n_particles), pb.x.dtype),
                                  jnp.asarray(rng.standard_normal((n_particles, pb.p)), pb.x.dtype),
                                  jnp.asarray(0, jnp.int32), key)


def _var_a(pb, s):
    return {"var_a": jnp.var(s.a)}


def _se(v):
    return float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def run(out_dir, quick: bool = False) -> dict:
    return C.run_stages(compute, plot, report, out_dir, quick)


def compute(quick: bool = False) -> dict:
    """The errors against N (particles), against eta (exact recursion) and the particle check
    of the recursion, with the fitted slopes (a plain dict)."""
    cfg = _settings(quick)
    x, y = _data()
    lam, tau = 1.0, 0.2
    opt = reference.linear_gaussian_optimum(x, y, lam, tau)
    eta = cfg["eta"]
    fp = reference.linear_scheme_fixed_point(x, y, lam, tau, eta)
    r_inf = 0.5 * float(np.mean((x @ fp.m - y) ** 2))
    # ---- against N ----
    n_rows = {k: [] for k in ("N", "dual_gap", "dual_gap_se", "risk_quad_excess", "risk_quad_excess_se",
                              "raw_risk_excess", "raw_risk_excess_se")}
    f_inf = x @ fp.m
    with jax.enable_x64(True):
        pb = Problem.create(x, y, activation="linear", lam=lam, tau=tau, bias=False)

        def rec(p, s):
            f = network.predict(p, s.a, s.w)
            return {"dual": _dual_closed(p, f), "risk": network.risk(p, f),
                    "quad": 0.5 * jnp.mean((f - f_inf) ** 2)}

        for n_part in C.stages(cfg["Ns"], "discretisation: particles N"):
            gaps, rex, quad = [], [], []
            for seed in range(cfg["n_seeds"]):
                st = _init(pb, n_part, 100 + seed)
                # one simulate call: burn-in and average share the compiled segment (record_every)
                _, h = loop.simulate(pb, st, dynamics.Langevin(eta), cfg["burn"] + cfg["avg"],
                                         record_every=cfg["every"], recorder=rec, record_initial=False)
                keep = np.asarray(h["step"]) > cfg["burn"]
                gaps.append(opt.free_energy - np.mean(h["dual"][keep]))
                rex.append(np.mean(h["risk"][keep]) - r_inf)
                quad.append(np.mean(h["quad"][keep]))
            gaps, rex, quad = np.asarray(gaps), np.asarray(rex), np.asarray(quad)
            n_rows["N"].append(n_part)
            n_rows["dual_gap"].append(float(gaps.mean()))
            n_rows["dual_gap_se"].append(_se(gaps))
            n_rows["risk_quad_excess"].append(float(quad.mean()))
            n_rows["risk_quad_excess_se"].append(_se(quad))
            n_rows["raw_risk_excess"].append(float(rex.mean()))
            n_rows["raw_risk_excess_se"].append(_se(rex))
    fit_gap = C.fit_power(n_rows["N"], n_rows["dual_gap"])
    fit_risk = C.fit_power(n_rows["N"], n_rows["risk_quad_excess"])
    # ---- against eta (exact N = infinity recursion) ----
    e_rows = {k: [] for k in ("eta", "var_a_error", "free_energy_error", "m_error")}
    for e in cfg["etas"]:
        fpe = reference.linear_scheme_fixed_point(x, y, lam, tau, e)
        e_rows["eta"].append(e)
        e_rows["var_a_error"].append(abs(fpe.sigma[0, 0] - opt.sigma[0, 0]))
        e_rows["free_energy_error"].append(reference.linear_free_energy(x, y, fpe.sigma, lam, tau) - opt.free_energy)
        e_rows["m_error"].append(float(np.max(np.abs(fpe.m - opt.m))))
    fit_var = C.fit_power(e_rows["eta"], e_rows["var_a_error"])
    fit_F = C.fit_power(e_rows["eta"], e_rows["free_energy_error"])
    # ---- particle check of the recursion's fixed point ----
    c_rows = {k: [] for k in ("eta", "var_a_particles", "se", "var_a_recursion", "var_a_star", "z_score")}
    with jax.enable_x64(True):
        for e in C.stages(cfg["check_etas"], "discretisation: particle check"):
            burn, avg = cfg["check_steps"]
            st = _init(pb, cfg["check_N"], 7)
            every = max(1, avg // 40)
            _, h = loop.simulate(pb, st, dynamics.Langevin(e), burn + avg, record_every=every, recorder=_var_a,
                                     record_initial=False)
            v = h["var_a"][np.asarray(h["step"]) > burn]
            # SE of a time average of correlated records: records spaced >= 1/lam apart are
            # near-independent; SE of one record's variance is v sqrt(2/N) (THEORY 3)
            n_eff = max(1, int(avg * e * lam / 1.0))
            se = float(np.mean(v) * math.sqrt(2.0 / cfg["check_N"]) / math.sqrt(min(n_eff, v.size)))
            vr = reference.linear_scheme_fixed_point(x, y, lam, tau, e).sigma[0, 0]
            c_rows["eta"].append(e)
            c_rows["var_a_particles"].append(float(np.mean(v)))
            c_rows["se"].append(se)
            c_rows["var_a_recursion"].append(float(vr))
            c_rows["var_a_star"].append(float(opt.sigma[0, 0]))
            c_rows["z_score"].append(float((np.mean(v) - vr) / se))
    fits = {"N_dual_gap": fit_gap, "N_risk": fit_risk, "eta_variance": fit_var, "eta_free_energy": fit_F}
    return dict(quick=quick, cfg=cfg, n=len(y), lam=lam, tau=tau, eta=eta, F_star=opt.free_energy,
                n_rows=n_rows, e_rows=e_rows, c_rows=c_rows, fits=fits)


def plot(res: dict, out) -> None:
    """``error_vs_N_and_eta.png``: the errors and their fitted power laws."""
    cfg, n_rows, e_rows, eta = res["cfg"], res["n_rows"], res["e_rows"], res["eta"]
    fits = res["fits"]
    fit_gap, fit_risk, fit_var, fit_F = (fits[k] for k in ("N_dual_gap", "N_risk", "eta_variance", "eta_free_energy"))
    plt = C.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    N = np.asarray(n_rows["N"], float)
    for key, fit, lab, mk in (("dual_gap", fit_gap, "F* - D(u(rho_N))", "o"),
                              ("risk_quad_excess", fit_risk, "(1/2n)|f_N - f_inf|^2 (risk excess, quadratic)",
                               "s")):
        yv = np.asarray(n_rows[key])
        axes[0].errorbar(N, yv, yerr=np.nan_to_num(n_rows[key + "_se"]), fmt=mk,
                         label=f"{lab}: slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]")
        if np.isfinite(fit["slope"]):
            axes[0].plot(N, np.exp(fit["intercept"]) * N ** fit["slope"], "k:", lw=1)
    axes[0].set_xscale("log")
    axes[0].set_yscale("log")
    axes[0].set_xlabel("number of particles N")
    axes[0].set_ylabel("time-averaged error (units of the loss)")
    axes[0].set_title(f"against N (eta = {eta}, {cfg['n_seeds']} seeds; expected slope -1)", fontsize=9)
    axes[0].legend(fontsize=7)
    et = np.asarray(e_rows["eta"])
    for key, fit, lab, mk in (("var_a_error", fit_var, "|Var_eta(a) - Var*(a)| (expected +1)", "o"),
                              ("free_energy_error", fit_F, "F(rho_eta) - F* (expected +2)", "s")):
        axes[1].plot(et, e_rows[key], mk + "-",
                     label=f"{lab}: slope {fit['slope']:.2f} [{fit['ci_low']:.2f}, {fit['ci_high']:.2f}]")
    axes[1].set_xscale("log")
    axes[1].set_yscale("log")
    axes[1].set_xlabel("step size eta")
    axes[1].set_ylabel("stationary error, N = infinity (exact recursion)")
    axes[1].set_title("against eta (linear case, plain scheme)", fontsize=9)
    axes[1].legend(fontsize=7)
    C.ticks_at(axes[0], cfg["Ns"])
    C.ticks_at(axes[1], cfg["etas"])
    C.caption(fig, activation="linear", loss="squared", lam=res["lam"], tau=res["tau"], eta=eta,
              extra=f"N = {cfg['Ns'][0]}-{cfg['Ns'][-1]} (left), N = infinity recursion (right); d = 1 without bias")
    C.savefig(fig, out / "error_vs_N_and_eta.png")


def report(res: dict, out, *, wall: float) -> dict:
    """The CSV tables, ``report.md`` and ``summary.json``; returns the summary."""
    cfg, n_rows, e_rows, c_rows, fits = res["cfg"], res["n_rows"], res["e_rows"], res["c_rows"], res["fits"]
    lam, tau, eta, quick = res["lam"], res["tau"], res["eta"], res["quick"]
    C.write_csv(out / "error_vs_N.csv", n_rows)
    C.write_csv(out / "error_vs_eta.csv", e_rows)
    C.write_csv(out / "particle_check.csv", c_rows)
    expected = {"N_dual_gap": -1.0, "N_risk": -1.0, "eta_variance": 1.0, "eta_free_energy": 2.0}
    ftab = {"quantity": list(fits), "expected": [expected[k] for k in fits],
            "slope": [fits[k]["slope"] for k in fits], "ci_low": [fits[k]["ci_low"] for k in fits],
            "ci_high": [fits[k]["ci_high"] for k in fits],
            "within_0.25": [bool(abs(fits[k]["slope"] - expected[k]) <= 0.25) for k in fits]}
    C.write_csv(out / "slopes.csv", ftab)
    return C.finish(out, NAME, "Discretisation errors: particles and time step", [
        ("Setting", f"Linear activation, squared loss, d = 1 without bias, n = {res['n']}, lam = {lam}, tau = {tau}; "
                    f"rho*, F* = {res['F_star']:.6g} and the N = infinity scheme laws in closed form "
                    f"(mfld.reference). Against N: eta = {eta}, burn-in {cfg['burn']} steps, average over "
                    f"{cfg['avg']} steps, {cfg['n_seeds']} seeds. {'Quick' if quick else 'Full'} setting; "
                    f"wall time {wall:.0f} s."),
        ("What is measured", "Against N: time averages at stationarity over the seeds of the dual gap "
                             "F* - D(u(rho_N)) (closed-form D) and of the quadratic part of the risk excess over "
                             "the exact N = infinity predictor of the same scheme. Against eta: exact "
                             "stationary errors of the N = infinity scheme (covariance recursion, no particle "
                             "noise) in Var(a) and in F, and a particle check of that recursion."),
        ("What the theory predicts", "THEORY 3: particle error O(1/N) in the objective and the dual gap (slope "
                                     "-1), uniform in time under LSI; time-step error O(eta) in variances (slope "
                                     "+1) and O(eta^2) in F, the risk and E[a w] (slope +2, F is minimal at rho*). "
                                     "Not predicted: the constants, the raw risk excess's O(N^-1/2) fluctuations "
                                     "(so it is not fitted), or any order for the k-NN entropy (too noisy here)."),
        ("Fitted slopes (95% t-intervals)", C.md_table(ftab)),
        ("Against N", C.md_table(n_rows)),
        ("Against eta (exact recursion)", C.md_table(e_rows)),
        ("Particle check of the recursion", "Time-averaged Var(a) of N particles against the recursion's "
                                            "fixed point (z-score with the sampling SE):\n\n" + C.md_table(c_rows)),
    ], quick=quick, wall=wall,
                    files=["error_vs_N_and_eta.png", "error_vs_N.csv", "error_vs_eta.csv", "particle_check.csv",
                           "slopes.csv"],
                    fits=fits, expected=expected, particle_check=c_rows)
