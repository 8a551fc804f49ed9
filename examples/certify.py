"""Certify a run and compare it with the theory: the README's second example (executed by the tests)."""

import mfld
from mfld import theory

data = mfld.teacher_student(seed=0)  # the default problem: 1-D input + bias, so w is in R^2
problem = mfld.Problem.create(data.x, data.y, activation="tanh", lam=0.1, tau=0.05)
opt = mfld.solve_optimum(problem)  # F* = max_u D(u), here by exact quadrature


def certify(state, row):  # called at each record; adds columns to the row
    row.update(mfld.certify(problem, state.a, state.w, optimum=opt))


state = mfld.init_particles(problem, n_particles=4000, seed=0)
state, hist = mfld.simulate(problem, state, mfld.Langevin(eta=0.02), n_steps=300, record_every=10,
                            callback=certify)
print(f"F* = {opt.F_star:.6f}; at t = {hist['t'][-1]:g}: "
      f"{hist['dual_lower'][-1]:.6f} <= F* <= {hist['primal_upper'][-1]:.6f}")

fit = theory.fit_rate(hist["t"], hist["gap"])  # linear convergence: log gap ~ -rate * t
bound = theory.lsi_lower_bound(problem, risk=hist["risk"][-1])  # THEORY section 5, at the current risk
print(f"measured rate {fit.rate:.2f} (95% CI {fit.ci_low:.2f}-{fit.ci_high:.2f}); "
      f"guaranteed rate 2 tau alpha >= {bound.rate:.3g}")
