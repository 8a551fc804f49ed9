"""What certificates cost a run: `mfld run` with certificates on against off (issue 10, item 7).

Each contender is one `mfld run` in a fresh process (`python -m mfld.cli run ...`), so JAX
start-up, compilation, the optimum solve and the figures are counted as a user sees them.
Rounds alternate (off, on, off, on, ...) so a busy machine slows both alike; the table reports
medians with min-max over the rounds and the 1-minute load average around each case.

- **off**: `record.certify_every=0` (the optimum F* is still solved, as by default);
- **on**: the default record settings (`record.certify_every` as in `mfld config`), or
  `--certify-every K` to try another value.

Overhead ratio = (T_on - T_off) / T_off, from the process wall times (median of the per-round
ratios; "in-run" uses summary.json's run_time_s, which leaves out Python/JAX start-up). The
target of issue 10 is at most 1x at d = 10, N = 4000. Each `on` run also reports its number of
certified records and the mean time of one certificate (from the gap records' count and the
difference of the in-run times).

    python benchmarks/bench_certify.py                   # d = 10, N = 4000 plus the d/N table
    python benchmarks/bench_certify.py --quick           # one case, two rounds
    python benchmarks/bench_certify.py --cases 10:4000 --rounds 3 --json out.json
    python benchmarks/bench_certify.py --breakdown 10:4000    # where one certificate's time goes

``--breakdown`` times, in one process (after a warm-up call), the parts of one certificate
record against 100 steps of the dynamics: the log Z evaluation (closed form / quadrature /
Monte Carlo, with the sigma(X W) matrix cached across records as `mfld.duality` does), the
k-NN free-energy estimate, and the whole `mfld.duality.certify` call; medians of 5
repetitions on 5 different states (min-max in brackets).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_CASES = ["10:4000", "1:4000", "5:4000", "10:1000", "10:16000"]


def one_run(d: int, n: int, certify: bool, steps: int, certify_every: int | None, workdir: Path) -> dict:
    out = Path(tempfile.mkdtemp(dir=workdir))
    args = [sys.executable, "-m", "mfld.cli", "run", "--quiet", "--overwrite", "--out", str(out),
            "--set", f"data.params.d={d}", "--set", f"model.n_particles={n}", "--set", f"dynamics.steps={steps}"]
    if not certify:
        args += ["--set", "record.certify_every=0"]
    elif certify_every is not None:
        args += ["--set", f"record.certify_every={certify_every}"]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode not in (0, 3):
        raise RuntimeError(f"mfld run failed ({proc.returncode}): {proc.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    n_cert = 0
    if certify:
        import csv

        with open(out / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        n_cert = sum(1 for r in rows if r.get("gap", "nan") not in ("nan", ""))
    shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "run_s": float(summary["run_time_s"]), "n_cert": n_cert,
            "load": (load0 + os.getloadavg()[0]) / 2, "status": summary["status"]}


def _med(v):
    return statistics.median(v), min(v), max(v)


def bench_case(d, n, rounds, steps, certify_every, workdir, log):
    res = {"off": [], "on": []}
    for r in range(rounds):
        order = ("off", "on") if r % 2 == 0 else ("on", "off")  # alternate which goes first
        for which in order:
            res[which].append(one_run(d, n, which == "on", steps, certify_every, workdir))
            x = res[which][-1]
            log(f"  d={d} N={n} round {r + 1} {which:3s}: wall {x['wall_s']:.1f} s, in-run {x['run_s']:.1f} s, "
                f"certified records {x['n_cert']}, load {x['load']:.1f}")
    ratios = [(on["wall_s"] - off["wall_s"]) / off["wall_s"] for on, off in zip(res["on"], res["off"], strict=True)]
    ratios_in = [(on["run_s"] - off["run_s"]) / off["run_s"] for on, off in zip(res["on"], res["off"], strict=True)]
    n_cert = res["on"][0]["n_cert"]
    per_cert = [(on["run_s"] - off["run_s"]) / max(n_cert, 1) for on, off in zip(res["on"], res["off"], strict=True)]
    return {"d": d, "N": n, "steps": steps, "rounds": rounds, "n_cert": n_cert,
            "off_wall": _med([x["wall_s"] for x in res["off"]]), "on_wall": _med([x["wall_s"] for x in res["on"]]),
            "ratio": _med(ratios), "ratio_in_run": _med(ratios_in), "per_cert_s": _med(per_cert),
            "load": _med([x["load"] for x in res["off"] + res["on"]]), "raw": res}


def table(rows) -> str:
    head = ("| d | N | certified records | off: wall s | on: wall s | overhead (on-off)/off | in-run overhead "
            "| s per certificate | load avg |\n|---|---|---|---|---|---|---|---|---|\n")

    def f(t, p=2):
        return f"{t[0]:.{p}f} ({t[1]:.{p}f}-{t[2]:.{p}f})"

    return head + "".join(
        f"| {r['d']} | {r['N']} | {r['n_cert']} | {f(r['off_wall'], 1)} | {f(r['on_wall'], 1)} | {f(r['ratio'])} "
        f"| {f(r['ratio_in_run'])} | {f(r['per_cert_s'])} | {f(r['load'], 1)} |\n" for r in rows)


def breakdown(d: int, n: int, reps: int = 5) -> dict:
    import numpy as np

    from mfld import config as cfgmod
    from mfld import duality, dynamics, entropy, gibbs, loop
    from mfld.app import inputs

    cfg = cfgmod.load(None, [f"data.params.d={d}", f"model.n_particles={n}"])
    pb = inputs.build_problem(cfg, inputs.make_dataset(cfg))
    st = dynamics.init_particles(pb, n, 0)
    stepper = dynamics.Langevin(cfg.dynamics.eta)
    st, _ = loop.simulate(pb, st, stepper, 100, record_every=100)  # compiled, and off the start
    states, t_steps = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        st, _ = loop.simulate(pb, st, stepper, 100, record_every=100)
        np.asarray(st.w)
        t_steps.append(time.perf_counter() - t0)
        states.append((np.asarray(st.a), np.asarray(st.w)))
    rec = cfg.record
    duality.certify(pb, *states[0], method=rec.certify_method, n_samples=rec.certify_samples)  # warm-up
    spec = gibbs.make_spec(pb)
    parts = {"100 steps": t_steps, "log Z (dual and primal)": [], "k-NN free energy": [], "certify (all)": []}
    method = None
    for a, w in states:
        a64, w64 = np.asarray(a, np.float64), np.asarray(w, np.float64)
        u = spec.loss_deriv(gibbs.network_output(spec, a64, w64), spec.y)
        t0 = time.perf_counter()
        ev = gibbs.evaluate_spec(spec, u, rec.certify_method, rec.certify_samples, 0)
        parts["log Z (dual and primal)"].append(time.perf_counter() - t0)
        method = ev.method
        t0 = time.perf_counter()
        entropy.free_energy_estimate(pb, a64, w64)
        parts["k-NN free energy"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        duality.certify(pb, a, w, method=rec.certify_method, n_samples=rec.certify_samples)
        parts["certify (all)"].append(time.perf_counter() - t0)
    return {"d": d, "N": n, "method": method, "particle_dim": pb.particle_dim,
            "parts": {k: _med(v) for k, v in parts.items()}, "load": os.getloadavg()[0]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(DEFAULT_CASES), help="d:N,d:N,... (first: the headline case)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of the first case (the others: --table-rounds)")
    ap.add_argument("--table-rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=1000, help="dynamics.steps (default config: 1000)")
    ap.add_argument("--certify-every", type=int, default=None, help="record.certify_every of 'on' (default: config's)")
    ap.add_argument("--quick", action="store_true", help="only the first case, 2 rounds")
    ap.add_argument("--json", default=None, help="write the results here")
    ap.add_argument("--breakdown", default=None, metavar="d:N,...", help="time the parts of one certificate")
    args = ap.parse_args(argv)
    if args.breakdown:
        for c in args.breakdown.split(","):
            d, n = (int(v) for v in c.split(":"))
            b = breakdown(d, n)
            print(f"d={d} N={n} (particle dim {b['particle_dim']}, log Z by {b['method']}, load {b['load']:.1f}):")
            for k, (m, lo, hi) in b["parts"].items():
                print(f"  {k:26s} {1000 * m:8.1f} ms  ({1000 * lo:.1f}-{1000 * hi:.1f})")
        return
    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(",") if c]
    if args.quick:
        cases, args.rounds = cases[:1], 2
    from mfld import config as cfgmod

    ce = args.certify_every if args.certify_every is not None else cfgmod.Config().record.certify_every
    print(f"# bench_certify: steps={args.steps}, record.every=10, certify_every={ce} (on) / 0 (off); "
          f"cpu_count={os.cpu_count()}, load {os.getloadavg()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (d, n) in enumerate(cases):
            rows.append(bench_case(d, n, args.rounds if i == 0 else args.table_rounds, args.steps,
                                   args.certify_every, Path(tmp), lambda s: print(s, flush=True)))
    print()
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"certify_every": ce, "steps": args.steps, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
