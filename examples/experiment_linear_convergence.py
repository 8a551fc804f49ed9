"""A quick experiment: linear convergence against the section-5 bound.

``mfld experiment linear-convergence --quick`` from Python: for two settings of (lam, tau) the
exact mean-field gap F(rho_t) - F* (Fokker-Planck PDE on a grid), its fitted rate with a 95%
interval, the guaranteed envelope of THEORY §5, and the particles' certified F* - D(u_t). The
full setting (six settings, finer grid, more particles) is the same call without ``quick=True``.
"""

from mfld.experiments import run_experiment

out = run_experiment("linear-convergence", "experiments/linear-convergence", quick=True)
rates = (out / "rates.csv").read_text().splitlines()
print(f"wrote {out}/report.md and {len(rates) - 1} rows of rates.csv")
