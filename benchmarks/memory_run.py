"""Peak memory of a whole ``mfld run`` (records, certificates, checkpoint and figures
included) against the documented step formula (docs/performance.md):

    step peak ~= 5 N D s + n p s + 3 c b s          (s = 4 bytes in float32)

The run is a fresh ``mfld run`` process; its resident set size is sampled every 0.2 s
(``/proc/PID/status``) and the phase is read from the run directory (``figures/`` appearing
marks the start of plotting). Reported: the peak RSS of the whole run, the peak before the
figures, the RSS of the same process after importing JAX and compiling nothing (the
baseline of any run), and the formula.

    python benchmarks/memory_run.py                 # N = 1e7, teacher-student defaults (n = 64, d = 1), no certificates
    python benchmarks/memory_run.py --certify-every 10   # with the certificates (1.24 GB, 190 s at N = 1e7, 1 thread)
    python benchmarks/memory_run.py --N 3e7 --steps 20 --keep /tmp/big
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rss_mb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for ln in f:
                if ln.startswith("VmRSS:"):
                    return int(ln.split()[1]) / 1e3
    except OSError:
        return None
    return None


def baseline_mb():
    code = ("import resource, jax, jax.numpy as jnp, numpy, matplotlib; import mfld.app.runner; "
            "jnp.ones(3).block_until_ready(); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env())
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--N", type=float, default=1e7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--every", type=int, default=10, help="record.every")
    ap.add_argument("--certify-every", type=int, default=0,
                    help="record.certify_every (default 0: no certificates; at N = 1e7 with 10 the whole run "
                         "peaked at 1.24 GB in 190 s on 2026-12-01, see docs/performance.md)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--keep", default=None, help="run directory to keep (default: a temporary one)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    N = int(args.N)
    import yaml

    tmp = tempfile.mkdtemp(prefix="mfld-mem-")
    out_dir = args.keep or os.path.join(tmp, "run")
    cfg = {"name": "memory", "model": {"n_particles": N},
           "dynamics": {"steps": args.steps},
           "record": {"every": args.every, "checkpoint_every": 0, "progress": False,
                      "certify_every": args.certify_every}}
    cfg_path = os.path.join(tmp, "config.yaml")
    with open(cfg_path, "w") as f:
        yaml.safe_dump(cfg, f)
    cmd = [sys.executable, "-m", "mfld.cli", "run", cfg_path, "--out", out_dir, "--overwrite"]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples, fig_t = [], None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        r = rss_mb(proc.pid)
        t = time.perf_counter() - t0
        if r is not None:
            samples.append((t, r))
        if fig_t is None and os.path.isdir(os.path.join(out_dir, "figures")):
            fig_t = t
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log = proc.stdout.read()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(log[-3000:])
        sys.exit(f"mfld run failed with exit code {proc.returncode}")
    peak = max(usage.ru_maxrss / 1e3, max(r for _, r in samples))  # the kernel's high-water mark
    peak_before_fig = max((r for t, r in samples if fig_t is None or t < fig_t), default=None)
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    from mfld import blocking

    n, d = 64, 1
    p, D, s = d + 1, d + 2, 4
    plan = blocking.plan_chunks(N, n, s, n_features=p, threads=args.threads)
    formula = (5 * N * D * s + n * p * s + 3 * plan.particles * plan.data * s) / 1e6
    base = baseline_mb()
    res = {"N": N, "n": n, "d": d, "steps": args.steps, "wall_s": wall, "figures_started_s": fig_t,
           "peak_rss_MB": peak, "certify_every": cfg["record"]["certify_every"],
           "peak_rss_before_figures_MB": peak_before_fig, "baseline_rss_MB": base,
           "formula_MB": formula, "plan": list(plan), "run_time_s": summary.get("run_time_s"),
           "peak_over_formula": peak / formula,
           "peak_over_formula_plus_baseline": None if base is None else peak / (formula + base),
           "load_avg_end": os.getloadavg()}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**res, "samples": samples}, f)
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
