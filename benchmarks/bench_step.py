"""Steps per second of one noisy MFLD step: mfld vs a hand-written NumPy step vs a naive
PyTorch loop (when torch is importable), side by side in ONE process, repetitions
interleaved so that a busy machine slows every contender alike.

One step = tanh network, squared loss, bias feature, full batch, Euler-Maruyama update
with Gaussian noise, float32. Flop count used for the GEMM share: 4 n d N per step (two
GEMMs), against the fp32 GEMM ceiling measured in the same run (best of NumPy and JAX on a
square matmul). "x unfused": mfld against the same step compiled without mfld's XLA
options (mfld.xla: YNNPACK dot fusion), also interleaved in the same run.

    python benchmarks/bench_step.py                   # the issue's grid + scaling
    python benchmarks/bench_step.py --threads 1       # one core
    python benchmarks/bench_step.py --quick           # smaller repetitions
    python benchmarks/bench_step.py --memory-check    # peak RSS of one N=1e6, n=1e4, d=100 step

torch is NOT a dependency of mfld; install it only to benchmark (``pip install torch``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

GRID = [(256, 10, 1024), (1024, 50, 4096), (4096, 100, 16384), (512, 2, 100000)]
ETA, LAM, TAU = 0.01, 0.1, 0.01


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="pin to this many cores (before JAX starts)")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions per contender")
    ap.add_argument("--target-seconds", type=float, default=1.5,
                    help="wall time of one repetition (mfld: one compiled call of that many steps, as a "
                         "run's segments are; with 0.4 s the big size ran 2 steps per call and lost ~10 %% "
                         "to per-call costs)")
    ap.add_argument("--settle", type=float, default=0.3,
                    help="seconds of idle before each timed repetition: OpenBLAS worker threads spin "
                         "~0.1 s after a call (OpenMP's and XLA's briefly), which would slow whichever "
                         "contender runs next")
    ap.add_argument("--quick", action="store_true", help="3 repetitions of ~0.2 s")
    ap.add_argument("--no-scaling", action="store_true", help="skip the N and n scaling tables")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--memory-check", action="store_true", help="only: peak RSS of one big step")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--only", default=None, help="only these grid rows, e.g. 4096,100,16384 (';'-separated)")
    return ap.parse_args()


ARGS = parse()
if ARGS.threads:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mfld.sharding import configure_cpu

    configure_cpu(threads=ARGS.threads)
if ARGS.quick:
    ARGS.reps, ARGS.target_seconds = 3, 0.2

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mfld import dynamics, network, xla  # noqa: E402
from mfld.problem import Problem  # noqa: E402

try:
    if ARGS.no_torch:
        raise ImportError
    import torch

    if ARGS.threads:
        torch.set_num_threads(ARGS.threads)
except ImportError:
    torch = None


# ------------------------------------------------------------------------------ contenders
def make_mfld(x, y, a, w, fused=True):
    """mfld's step; ``fused=False``: the same program compiled without mfld's XLA options
    (YNNPACK dot fusion, :mod:`mfld.xla`), to measure what they give side by side."""
    problem = Problem.create(x, y, activation="tanh", lam=LAM, tau=TAU, bias=True, dtype=jnp.float32)
    state = dynamics.ParticleState(jnp.asarray(a), jnp.asarray(w), jnp.asarray(0, jnp.int32),
                                   dynamics.dynamics_keys(0)[1])
    stepper = dynamics.Langevin(ETA)
    holder = {"s": state}

    plain = jax.jit(dynamics.run_steps, static_argnames=("n_steps",), donate_argnames=("state",))

    def run(k):
        if fused:
            holder["s"] = dynamics._advance(problem, holder["s"], stepper, k, True)
        else:
            holder["s"] = plain(problem, holder["s"], stepper, n_steps=k)[0]
        holder["s"].w.block_until_ready()

    return run


def make_numpy(x, y, a, w):
    """The step a careful researcher writes by hand: in-place tanh, BLAS GEMMs."""
    xf = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1).astype(np.float32)
    yf = y.astype(np.float32)
    st = {"a": a.copy(), "w": w.copy()}
    rng = np.random.default_rng(0)
    n = xf.shape[0]
    N = a.shape[0]
    sd = np.float32(np.sqrt(2 * ETA * TAU))

    def one():
        a, w = st["a"], st["w"]
        s = w @ xf.T                      # (N, n)
        np.tanh(s, out=s)
        f = (a @ s) / N
        u = f - yf
        g = (s @ u) / n
        np.multiply(s, s, out=s)          # s <- (1 - s^2) u
        np.subtract(1.0, s, out=s)
        s *= u
        gw = (s @ xf) * (a / n)[:, None]
        xi = rng.standard_normal((N, w.shape[1] + 1), dtype=np.float32)
        w -= ETA * (gw + LAM * w)
        w += sd * xi[:, 1:]
        a -= ETA * (g + LAM * a)
        a += sd * xi[:, 0]

    def run(k):
        for _ in range(k):
            one()

    return run


def make_torch(x, y, a, w):
    """A naive PyTorch loop: nn.Module, autograd on the finite loss, manual noisy update."""
    xt = torch.tensor(np.concatenate([x, np.ones((x.shape[0], 1))], axis=1), dtype=torch.float32)
    yt = torch.tensor(y, dtype=torch.float32)
    N = a.shape[0]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Parameter(torch.tensor(a))
            self.w = torch.nn.Parameter(torch.tensor(w))

        def forward(self, inp):
            return torch.tanh(inp @ self.w.T) @ self.a / N

    net = Net()
    gen = torch.Generator().manual_seed(0)
    sd = float(np.sqrt(2 * ETA * TAU))

    def run(k):
        for _ in range(k):
            net.zero_grad()
            f = net(xt)
            loss = 0.5 * ((f - yt) ** 2).mean() + LAM / (2 * N) * ((net.a ** 2).sum() + (net.w ** 2).sum())
            loss.backward()
            with torch.no_grad():
                for p in (net.a, net.w):
                    p -= ETA * N * p.grad
                    p += sd * torch.randn(p.shape, generator=gen)

    return run


# ------------------------------------------------------------------------------- measuring
def gemm_ceiling(size=2048, reps=5):
    a = np.random.default_rng(0).standard_normal((size, size)).astype(np.float32)
    best = {}
    for name, fn in [("numpy", lambda: a @ a)]:
        fn()
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        best[name] = 2 * size ** 3 / min(ts) / 1e9
    aj = jnp.asarray(a)
    mm = jax.jit(lambda m: m @ m)
    mm(aj).block_until_ready()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        mm(aj).block_until_ready()
        ts.append(time.perf_counter() - t)
    best["jax"] = 2 * size ** 3 / min(ts) / 1e9
    return max(best.values()), best


def calibrate(run, target):
    run(1)  # compile / warm up
    t = time.perf_counter()
    run(1)
    dt = max(time.perf_counter() - t, 1e-5)
    k = max(1, int(target / dt))
    run(k)  # compiles the k-step scan for mfld
    return k


def bench(contenders: dict, reps: int, target: float):
    ks = {name: calibrate(run, target) for name, run in contenders.items()}
    times = {name: [] for name in contenders}
    for _ in range(reps):  # interleaved
        for name, run in contenders.items():
            time.sleep(ARGS.settle)  # let the previous contender's pool threads stop spinning
            t = time.perf_counter()
            run(ks[name])
            times[name].append((time.perf_counter() - t) / ks[name])
    return {name: {"median_s": statistics.median(ts), "best_s": min(ts), "steps": ks[name]}
            for name, ts in times.items()}


def data(n, d, N, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.tanh(x[:, 0]) + 0.1 * rng.standard_normal(n)
    a = rng.standard_normal(N).astype(np.float32)
    w = (rng.standard_normal((N, d + 1)) / np.sqrt(d + 1)).astype(np.float32)
    return x, y, a, w


def machine():
    info = {"python": platform.python_version(), "jax": jax.__version__, "numpy": np.__version__,
            "torch": None if torch is None else torch.__version__, "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_avg": os.getloadavg(), "device": str(jax.devices()[0].device_kind)}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


MEMORY_SCRIPT = """
import json, resource, time
import jax, jax.numpy as jnp, numpy as np
from mfld.problem import Problem
from mfld.dynamics import Langevin, init_particles, step
N, n, d = 10 ** 6, 10 ** 4, 100
rng = np.random.default_rng(0)
problem = Problem.create(rng.standard_normal((n, d)), rng.standard_normal(n), dtype=jnp.float32)
st = init_particles(problem, N, 0)
t = time.perf_counter()
new, info = jax.jit(step)(problem, st, Langevin(0.1))
new.w.block_until_ready()
print(json.dumps({"maxrss_GB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
                  "seconds_incl_compile": time.perf_counter() - t, "risk": float(info.risk)}))
"""


def memory_check():
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env)
    print(out.stdout.strip() or out.stderr[-2000:])


def main():
    if ARGS.memory_check:
        memory_check()
        return
    info = machine()
    info["xla_compiler_options"] = xla.compiler_options()
    print("machine:", json.dumps(info))
    ceiling, parts = gemm_ceiling()
    print(f"fp32 GEMM ceiling: {ceiling:.0f} GFLOP/s ({', '.join(f'{k} {v:.0f}' for k, v in parts.items())})")
    results = {"machine": info, "ceiling_gflops": ceiling, "grid": [], "scaling_N": [], "scaling_n": []}
    hdr = (f"{'n':>5} {'d':>4} {'N':>7} | {'mfld':>8} {'numpy':>8} {'torch':>8} | "
           f"{'x numpy':>7} {'x torch':>7} | {'GEMM %':>6} {'best':>4} | {'x unfused':>9}")
    print("\nsteps/s (median of interleaved repetitions; GEMM % of the median and of the best "
          "repetition)\n" + hdr + "\n" + "-" * len(hdr))
    grid = GRID if not ARGS.only else [tuple(int(v) for v in row.split(",")) for row in ARGS.only.split(";")]
    for n, d, N in grid:
        x, y, a, w = data(n, d, N)
        cont = {"mfld": make_mfld(x, y, a, w), "numpy": make_numpy(x, y, a, w)}
        if xla.compiler_options():
            cont["mfld_unfused"] = make_mfld(x, y, a, w, fused=False)
        if torch is not None:
            cont["torch"] = make_torch(x, y, a, w)
        r = bench(cont, ARGS.reps, ARGS.target_seconds)
        sps = {k: 1 / v["median_s"] for k, v in r.items()}
        share = 4 * n * d * N / r["mfld"]["median_s"] / 1e9 / ceiling
        share_best = 4 * n * d * N / r["mfld"]["best_s"] / 1e9 / ceiling
        row = {"n": n, "d": d, "N": N, "steps_per_s": sps, "gemm_share": share, "gemm_share_best": share_best,
               "plan": list(network.plan_chunks(N, n, 4, n_features=d + 1)), "raw": r,
               "load_avg": os.getloadavg()}
        results["grid"].append(row)
        tsp = sps.get("torch")
        t_s = f"{tsp:.1f}" if tsp else "-"
        t_r = f"{sps['mfld'] / tsp:.2f}" if tsp else "-"
        u_r = f"{sps['mfld'] / sps['mfld_unfused']:.2f}" if "mfld_unfused" in sps else "-"
        print(f"{n:>5} {d:>4} {N:>7} | {sps['mfld']:>8.1f} {sps['numpy']:>8.1f} {t_s:>8} | "
              f"{sps['mfld'] / sps['numpy']:>7.2f} {t_r:>7} | {100 * share:>5.0f}% {100 * share_best:>3.0f}% | {u_r:>9}"
              f"   load {os.getloadavg()[0]:.1f}",
              flush=True)
    if not ARGS.no_scaling:
        print("\nscaling with N (n = 256, d = 10): ms/step, ns per (particle x data) pair")
        for N in (10 ** 3, 10 ** 4, 10 ** 5, 10 ** 6):
            x, y, a, w = data(256, 10, N)
            r = bench({"mfld": make_mfld(x, y, a, w)}, max(2, ARGS.reps // 2), ARGS.target_seconds)["mfld"]
            results["scaling_N"].append({"N": N, "ms": 1e3 * r["median_s"]})
            print(f"  N={N:>8}: {1e3 * r['median_s']:9.3f} ms  {1e9 * r['median_s'] / (N * 256):6.2f} ns/pair",
                  flush=True)
        print("scaling with n (N = 4096, d = 10): ms/step, ns per pair")
        for n in (256, 1024, 4096, 16384):
            x, y, a, w = data(n, 10, 4096)
            r = bench({"mfld": make_mfld(x, y, a, w)}, max(2, ARGS.reps // 2), ARGS.target_seconds)["mfld"]
            results["scaling_n"].append({"n": n, "ms": 1e3 * r["median_s"]})
            print(f"  n={n:>8}: {1e3 * r['median_s']:9.3f} ms  {1e9 * r['median_s'] / (n * 4096):6.2f} ns/pair",
                  flush=True)
    results["load_avg_end"] = os.getloadavg()
    print("load average at start / end:", info["load_avg"], results["load_avg_end"])
    if ARGS.json:
        with open(ARGS.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
