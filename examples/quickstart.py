"""Quickstart: the README's Python example (executed by the tests)."""

import numpy as np

import mfld

# The library level: a Problem, particles, and the jitted simulator.
data = mfld.teacher_student(n=64, d=1, seed=0)
problem = mfld.Problem.create(data.x, data.y, activation="tanh", lam=0.1, tau=0.05)
state = mfld.init_particles(problem, n_particles=1000, seed=0)
state, history = mfld.simulate(problem, state, mfld.Langevin(eta=0.05), n_steps=500, record_every=50)
print(history["t"][-1], history["risk"][-1])

# The application level: the same fields as the YAML config, and plain arrays for your own data.
# lam and tau bias the fit: at the defaults (0.1, 0.05) even the global optimum has risk 0.18 on
# sin(2x); at (0.01, 0.002) it has 0.018, and 1000 steps of eta = 0.2 get close to it.
x = np.linspace(-2, 2, 50)[:, None]
res = mfld.run({"objective": {"lam": 0.01, "tau": 0.002}, "dynamics": {"eta": 0.2, "steps": 1000},
                "record": {"every": 50, "certify_every": 0, "optimum": False}},
               x=x, y=np.sin(2 * x[:, 0]), out="runs/quickstart", overwrite=True, progress=False)
print(res.summary["final"]["risk"])
run = mfld.load_run("runs/quickstart")     # config, metrics table, summary and final particles
print(run.metrics["risk"][-1], run.a.shape)
