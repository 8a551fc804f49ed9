"""Steps per second of one noisy MFLD step: mfld against hand-written NumPy and two PyTorch
steps, every contender in its OWN FRESH PROCESS, rounds alternating, medians with min-max,
the machine's ceilings and load measured in the same run.

One step = tanh network, squared loss, bias feature, full batch, Euler-Maruyama update with
Gaussian noise (float32; the fp64 table: float64). Contenders:

- ``mfld``: ``mfld.dynamics`` jitted ``lax.scan`` segments (the library's own code path);
- ``mfld_unfused``: the same with ``MFLD_XLA_DOT_FUSION=0`` (no mfld XLA options);
- ``mfld_xla``: the same with ``MFLD_KERNELS=0`` (XLA's blocked drift instead of the compiled
  tanh kernels of :mod:`mfld.kernels`: the thin ones at p = d + 1 <= 9, the wide block ones
  above; every row of the table);
- ``numpy``: the step a careful researcher writes by hand (in-place tanh, BLAS GEMMs);
- ``torch_naive``: ``nn.Module`` + autograd of the finite loss, manual noisy update;
- ``torch_analytic``: the analytic drift in torch (``addmm``, in-place ``tanh_``, ``mv``, no
  autograd);
- fp64 table: ``mfld64`` (mfld with ``jax_enable_x64``, the CLI's ``--x64``) against
  ``numpy64`` at n = 1024, d = 10, N = 256 .. 131072.

Method. Each (row, round, contender) runs in a fresh Python process: import, build, compile,
calibrate ``k`` steps to ``--target-seconds`` (mfld: one compiled call of k steps, as a run's
segments are), then ``--inner`` timed calls of k steps after ``--settle`` s of idle; the
process reports the median of its calls. Rounds alternate the contenders (the order rotates
each round); the table gives the median over rounds and the min-max. Ceilings (another fresh
process per round): fp32 and fp64 GEMM (best of NumPy and XLA, 2048^2), and the activation
throughput: float32 ``tanh`` (and ``tanh`` with its derivative ``1 - t^2``) evaluated inside a
compiled XLA loop on a cache-resident array, per core (pinned to one core) and with all the
benchmark's threads.

Load. For each row: the 1-minute load average before and after, and the *foreign load*: the
cores busy with other processes while the row ran, ``(busy jiffies of /proc/stat -
this benchmark's own CPU time) / wall time``, plus the steal time. A row whose foreign load
exceeds ``--max-load`` (0.5) is marked ``LOADED`` and is not publishable. The load averages are
recorded, not used for that: the one before a row counts the benchmark's own previous row (the
1-minute average lags by a minute), the one after it the row's own threads; only the first
row's "before" says what the machine did before the benchmark started (printed with the table).

Shares. GEMM share: 4 n d N flops per step (the two GEMMs) over the fp32 GEMM ceiling.
Activation share: 2 n N evaluations per step (sigma in the forward pass, sigma and sigma'
in the backward; the derivative of tanh is 1 - t^2 of the same t) over the per-core
tanh throughput times the thread count.

    python benchmarks/bench_step.py                     # full run (~25 min on 2 idle cores)
    python benchmarks/bench_step.py --quick             # 2 rounds, short calls (~10 min)
    python benchmarks/bench_step.py --only 512,2,100000 --no-fp64
    python benchmarks/bench_step.py --threads 1
    python benchmarks/bench_step.py --memory-check      # peak RSS of one N=1e6, n=1e4, d=100 step

torch is NOT a dependency of mfld; install it only to benchmark (``pip install torch``; the
torch columns are left empty without it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRID = [(256, 10, 1024), (1024, 50, 4096), (4096, 100, 16384), (512, 2, 100000)]
FP64_GRID = [(1024, 10, N) for N in (256, 1024, 4096, 16384, 65536, 131072)]
CONTENDERS = ["mfld", "numpy", "torch_naive", "torch_analytic", "mfld_unfused", "mfld_xla"]
FP64_CONTENDERS = ["mfld64", "numpy64"]
ETA, LAM, TAU = 0.01, 0.1, 0.01


# ================================================================== child: one measurement
def _child_setup(threads):
    sys.path.insert(0, ROOT)
    if threads:
        from mfld.sharding import configure_cpu

        configure_cpu(threads=threads)


def data(n, d, N, dtype="float32", seed=0):
    import numpy as np

    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = np.tanh(x[:, 0]) + 0.1 * rng.standard_normal(n)
    a = rng.standard_normal(N).astype(dtype)
    w = (rng.standard_normal((N, d + 1)) / np.sqrt(d + 1)).astype(dtype)
    return x, y, a, w


def make_mfld(x, y, a, w, dtype="float32", tau=TAU):
    import jax
    import jax.numpy as jnp
    import numpy as np

    if dtype == "float64" and jnp.asarray(0.0, jnp.float64).dtype != jnp.float64:
        jax.config.update("jax_enable_x64", True)  # a fresh benchmark process (the CLI's --x64)
    from mfld import dynamics, loop
    from mfld.problem import Problem

    problem = Problem.create(x, y, activation="tanh", lam=LAM, tau=tau, bias=True, dtype=jnp.dtype(dtype))
    state = dynamics.ParticleState(jnp.asarray(a), jnp.asarray(w), jnp.asarray(0, jnp.int32),
                                   dynamics.dynamics_keys(0)[1])
    stepper = dynamics.Langevin(ETA)
    holder = {"s": state, "first": True}

    def run(k):
        # the caller's state is not donated (as in simulate), later segments are
        holder["s"] = loop.run_segment(problem, holder["s"], stepper, k, not holder["first"])
        holder["first"] = False
        holder["s"].w.block_until_ready()

    run.state = lambda: (np.asarray(holder["s"].a), np.asarray(holder["s"].w))
    return run


def make_numpy(x, y, a, w, dtype="float32", tau=TAU):
    """The step a careful researcher writes by hand: in-place tanh, BLAS GEMMs."""
    import numpy as np

    dt = np.dtype(dtype)
    xf = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1).astype(dt)
    yf = y.astype(dt)
    st = {"a": a.copy(), "w": w.copy()}
    rng = np.random.default_rng(0)
    n = xf.shape[0]
    N = a.shape[0]
    sd = dt.type(np.sqrt(2 * ETA * tau))
    eta, lam = dt.type(ETA), dt.type(LAM)

    def one():
        a, w = st["a"], st["w"]
        s = w @ xf.T                      # (N, n)
        np.tanh(s, out=s)
        f = (a @ s) / N
        u = f - yf
        g = (s @ u) / n
        np.multiply(s, s, out=s)          # s <- 1 - s^2
        np.subtract(1.0, s, out=s)
        gw = (s @ (u[:, None] * xf)) * (a / n)[:, None]
        xi = rng.standard_normal((N, w.shape[1] + 1), dtype=dt)
        w -= eta * (gw + lam * w)
        w += sd * xi[:, 1:]
        a -= eta * (g + lam * a)
        a += sd * xi[:, 0]

    def run(k):
        for _ in range(k):
            one()

    run.state = lambda: (st["a"], st["w"])
    return run


def make_torch_naive(x, y, a, w, dtype="float32", tau=TAU):
    """A naive PyTorch loop: nn.Module, autograd on the finite loss, manual noisy update."""
    import numpy as np
    import torch

    tdt = getattr(torch, dtype)
    xt = torch.tensor(np.concatenate([x, np.ones((x.shape[0], 1))], axis=1), dtype=tdt)
    yt = torch.tensor(y, dtype=tdt)
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
    sd = float(np.sqrt(2 * ETA * tau))

    def run(k):
        for _ in range(k):
            net.zero_grad()
            f = net(xt)
            loss = 0.5 * ((f - yt) ** 2).mean() + LAM / (2 * N) * ((net.a ** 2).sum() + (net.w ** 2).sum())
            loss.backward()
            with torch.no_grad():
                for p in (net.a, net.w):
                    p -= ETA * N * p.grad
                    p += sd * torch.randn(p.shape, generator=gen, dtype=tdt)

    run.state = lambda: (net.a.detach().numpy(), net.w.detach().numpy())
    return run


def make_torch_analytic(x, y, a, w, dtype="float32", tau=TAU):
    """The analytic drift in torch: one (N, n) buffer, addmm / in-place tanh_ / mv, no autograd."""
    import numpy as np
    import torch

    tdt = getattr(torch, dtype)
    xt = torch.tensor(np.concatenate([x, np.ones((x.shape[0], 1))], axis=1), dtype=tdt)
    yt = torch.tensor(y, dtype=tdt)
    at, wt = torch.tensor(a), torch.tensor(w)
    N, n = at.shape[0], xt.shape[0]
    s = torch.empty((N, n), dtype=tdt)
    gen = torch.Generator().manual_seed(0)
    sd = float(np.sqrt(2 * ETA * tau))

    def run(k):
        with torch.no_grad():
            for _ in range(k):
                torch.mm(wt, xt.T, out=s)
                s.tanh_()
                u = torch.mv(s.T, at).div_(N).sub_(yt)              # f - y
                g = torch.mv(s, u).div_(n)
                s.mul_(s).neg_().add_(1.0)                          # 1 - s^2
                gw = torch.mm(s, u[:, None] * xt).mul_((at / n)[:, None])
                xi = torch.randn((N, wt.shape[1] + 1), generator=gen, dtype=tdt)
                wt.sub_(ETA * (gw + LAM * wt)).add_(sd * xi[:, 1:])
                at.sub_(ETA * (g + LAM * at)).add_(sd * xi[:, 0])

    run.state = lambda: (at.numpy(), wt.numpy())
    return run


def _timed(run, target, inner, settle):
    """Warm up (compile), calibrate k steps to ~target seconds, then time ``inner`` calls.

    mfld compiles one program per segment length and two per length (the first segment does
    not donate the caller's state, later ones do), so the calibration times a call only after
    both programs of that length are compiled, and grows k until a call lasts target / 4: a
    step timed alone would be dominated by dispatch (small sizes) or, timed on its first
    donated call, by compilation (the bug that made calls of k = 1 step before 2026-12-01).
    """
    k = 1
    while True:
        run(k)
        run(k)  # both programs of this segment length are compiled now
        t = time.perf_counter()
        run(k)
        dt = max(time.perf_counter() - t, 1e-9)
        if dt >= target / 4 or k >= 1 << 20:
            break
        k = min(1 << 20, max(2 * k, int(k * target / (2 * dt))))
    k = max(1, int(k * target / dt))
    run(k)
    run(k)  # compile the final length (both programs)
    walls, cpus = [], []
    for _ in range(inner):
        time.sleep(settle)  # let BLAS/OpenMP pool threads of the warm-up stop spinning
        t, c = time.perf_counter(), time.process_time()
        run(k)
        walls.append((time.perf_counter() - t) / k)
        cpus.append((time.process_time() - c) / k)
    return {"s_per_step": statistics.median(walls), "cpu_s_per_step": statistics.median(cpus),
            "calls": walls, "steps_per_call": k}


def child_contender(spec):
    _child_setup(spec.get("threads"))
    name, dtype = spec["name"], spec.get("dtype", "float32")
    if name == "mfld_unfused":
        os.environ["MFLD_XLA_DOT_FUSION"] = "0"
    if name == "mfld_xla":
        os.environ["MFLD_KERNELS"] = "0"
    if name.startswith("torch"):
        import torch

        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
    x, y, a, w = data(spec["n"], spec["d"], spec["N"], dtype)
    maker = {"mfld": make_mfld, "mfld_unfused": make_mfld, "mfld_xla": make_mfld, "mfld64": make_mfld,
             "numpy": make_numpy, "numpy64": make_numpy, "torch_naive": make_torch_naive,
             "torch_analytic": make_torch_analytic}[name]
    run = maker(x, y, a, w, dtype)
    out = _timed(run, spec["target"], spec["inner"], spec["settle"])
    if name.startswith("mfld"):
        from mfld import blocking, kernels, xla

        out["plan"] = list(blocking.plan_chunks(spec["N"], spec["n"], 8 if dtype == "float64" else 4,
                                                n_features=spec["d"] + 1))
        out["xla_options"] = xla.compiler_options()
        out["kernels"] = kernels.status()
    out["maxrss_MB"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3
    return out


def _best_time(fn, reps):
    """(best wall time, best process CPU time) of ``fn()`` over ``reps`` calls after a warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        t, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return min(walls), min(cpus)


def _activation_rate(size, iters=400, reps=5):
    """float32 tanh evaluations per second inside a compiled XLA loop (array of ``size``
    elements, cache-resident), alone and with the derivative 1 - t^2 (counted as one
    evaluation of each)."""
    import jax
    import jax.numpy as jnp

    z = jnp.linspace(-3.0, 3.0, size, dtype=jnp.float32)
    tanh_loop = jax.jit(lambda v: jax.lax.fori_loop(0, iters, lambda i, s: jnp.tanh(s) * 3.0, v))

    def both(i, s):
        t = jnp.tanh(s)
        return (t + (1.0 - t * t)) * 2.0

    pair_loop = jax.jit(lambda v: jax.lax.fori_loop(0, iters, both, v))
    out = {}
    for key, f in (("tanh_per_s", tanh_loop), ("tanh_and_derivative_evals_per_s", pair_loop)):
        wall, cpu = _best_time(lambda f=f: f(z).block_until_ready(), reps)
        evals = (2 if key.startswith("tanh_and") else 1) * iters * size
        out[key] = evals / wall
        out[key.replace("_per_s", "_per_cpu_s")] = evals / cpu
    return out


def child_ceiling(spec):
    threads = spec.get("threads")
    _child_setup(threads)
    import numpy as np

    out = {}
    if spec.get("per_core"):  # already pinned to one core by the parent (threads=1)
        out.update(_activation_rate(1 << 15))
        return out
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    size = 2048
    for dtype in ("float32", "float64"):
        m = np.random.default_rng(0).standard_normal((size, size)).astype(dtype)
        mj = jnp.asarray(m)
        mm = jax.jit(lambda v: v @ v)
        flops = 2 * size ** 3
        times = {"numpy": _best_time(lambda m=m: m @ m, 4),
                 "xla": _best_time(lambda mm=mm, mj=mj: mm(mj).block_until_ready(), 4)}
        out[f"gemm_{dtype}_flops"] = max(flops / t[0] for t in times.values())
        out[f"gemm_{dtype}_flops_per_cpu_s"] = max(flops / t[1] for t in times.values())
        out[f"gemm_{dtype}_parts"] = {k: flops / t[0] for k, t in times.items()}
    n_threads = threads or len(os.sched_getaffinity(0))
    out.update({k + "_all_threads": v for k, v in _activation_rate((1 << 15) * n_threads).items()})
    return out


# ================================================================== parent: orchestration
def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="pin every contender to this many cores")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds (fresh processes each)")
    ap.add_argument("--inner", type=int, default=3, help="timed calls inside one process (median)")
    ap.add_argument("--target-seconds", type=float, default=1.0, help="wall time of one timed call")
    ap.add_argument("--settle", type=float, default=0.3, help="idle seconds before each timed call")
    ap.add_argument("--max-load", type=float, default=0.5, help="rows above this load are marked LOADED")
    ap.add_argument("--quick", action="store_true", help="2 rounds, 2 calls of ~0.4 s")
    ap.add_argument("--only", default=None, help="only these fp32 rows, e.g. '512,2,100000;256,10,1024'")
    ap.add_argument("--no-fp64", action="store_true", help="skip the fp64 table")
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 table")
    ap.add_argument("--fp64-only", default=None, help="only these N of the fp64 table, e.g. '256,131072'")
    ap.add_argument("--contenders", default=None, help="comma-separated subset of the fp32 contenders")
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--json", default=None, help="also write the results to this file")
    ap.add_argument("--memory-check", action="store_true", help="only: peak RSS of one big step")
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="only: print the markdown tables of a results file written by --json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


def _cpu_jiffies():
    with open("/proc/stat") as f:
        v = [int(t) for t in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    steal = v[7] if len(v) > 7 else 0
    return sum(v[:8]) - idle - steal, steal


class LoadMeter:
    """Foreign load while a row runs: busy CPU time of the machine minus our children's."""

    def __init__(self):
        self.tick = os.sysconf("SC_CLK_TCK")

    def __enter__(self):
        self.t0 = time.perf_counter()
        self.la0 = os.getloadavg()[0]
        self.own0 = self._own()
        self.busy0, self.steal0 = _cpu_jiffies()
        return self

    def _own(self):
        r = resource.getrusage(resource.RUSAGE_CHILDREN)
        s = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime

    def __exit__(self, *exc):
        wall = time.perf_counter() - self.t0
        busy, steal = _cpu_jiffies()
        own = self._own() - self.own0
        self.result = {"load_avg_before": self.la0, "load_avg_after": os.getloadavg()[0],
                       "foreign_load": max(0.0, ((busy - self.busy0) / self.tick - own) / wall),
                       "steal": (steal - self.steal0) / self.tick / wall, "wall_s": wall}
        return False


def run_child(spec):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {spec['kind']} {spec.get('name', '')} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def measure_ceilings(args, rounds):
    """Ceilings, one fresh process per round (the per-core activation rate pinned to one core)."""
    res = []
    for _ in range(rounds):
        c = run_child({"kind": "ceiling", "threads": args.threads})
        c.update(run_child({"kind": "ceiling", "threads": 1, "per_core": True}))
        res.append(c)
    keys = [k for k in res[0] if isinstance(res[0][k], float)]
    return {k: statistics.median(r[k] for r in res) for k in keys} | {"rounds": res}


def bench_row(args, row, contenders, dtype="float32"):
    n, d, N = row
    times = {c: [] for c in contenders}
    cpu_times = {c: [] for c in contenders}
    extra = {}
    with LoadMeter() as meter:
        for r in range(args.rounds):
            order = contenders[r % len(contenders):] + contenders[:r % len(contenders)]
            for c in order:
                spec = {"kind": "contender", "name": c, "n": n, "d": d, "N": N, "dtype": dtype,
                        "threads": args.threads, "target": args.target_seconds, "inner": args.inner,
                        "settle": args.settle}
                try:
                    out = run_child(spec)
                except RuntimeError as e:
                    print(f"    {c}: FAILED ({str(e).splitlines()[-1][:200]})", flush=True)
                    continue
                times[c].append(out["s_per_step"])
                cpu_times[c].append(out["cpu_s_per_step"])
                extra.setdefault(c, []).append({k: v for k, v in out.items() if k != "calls"})
    load = meter.result
    published = publishable(load, args.max_load)
    return {"n": n, "d": d, "N": N, "dtype": dtype, "steps_per_s": _rates(times),
            "steps_per_cpu_s": _rates(cpu_times), "seconds": times, "cpu_seconds": cpu_times,
            "load": load, "publishable": published, "children": extra}


def publishable(load: dict, max_load: float) -> bool:
    """A row is publishable when other processes kept at most ``max_load`` cores busy while it
    ran (its foreign load; see the module docstring for why not the load average)."""
    return load["foreign_load"] <= max_load


def _rates(times):
    return {c: {"median": 1 / statistics.median(t), "min": 1 / max(t), "max": 1 / min(t), "rounds": len(t)}
            for c, t in times.items() if t}


def ratio(sps, a, b):
    """median ratio and the range over rounds (min of a / max of b .. max of a / min of b)."""
    if a not in sps or b not in sps:
        return None
    return (sps[a]["median"] / sps[b]["median"], sps[a]["min"] / sps[b]["max"], sps[a]["max"] / sps[b]["min"])


def fmt_ratio(r):
    return "-" if r is None else f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})"


def machine():
    import numpy as np

    info = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg()}
    for mod in ("jax", "jaxlib", "torch"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        with open("/proc/cpuinfo") as f:
            txt = f.read()
        info["cpu"] = next(ln.split(":", 1)[1].strip() for ln in txt.splitlines() if ln.startswith("model name"))
        flags = next(ln for ln in txt.splitlines() if ln.startswith("flags")).split()
        info["simd"] = [f for f in ("avx2", "fma", "avx512f") if f in flags]
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def main_parent(args):
    if args.quick:
        args.rounds, args.inner, args.target_seconds = 2, 2, 0.4
    t_start = time.perf_counter()
    threads = args.threads or len(os.sched_getaffinity(0))
    info = machine()
    print("machine:", json.dumps(info), flush=True)
    have_torch = info["torch"] is not None and not args.no_torch
    ceil = measure_ceilings(args, args.rounds)
    act = ceil["tanh_per_s"] * threads  # per-core rate x threads: the ideal all-core rate
    print(f"ceilings ({threads} threads, median of {args.rounds} fresh processes): fp32 GEMM "
          f"{ceil['gemm_float32_flops'] / 1e9:.0f} GFLOP/s, fp64 GEMM {ceil['gemm_float64_flops'] / 1e9:.0f}; "
          f"tanh {ceil['tanh_per_s'] / 1e9:.2f} G/s per core (with 1-t^2: "
          f"{ceil['tanh_and_derivative_evals_per_s'] / 1e9:.2f} G evaluations/s), "
          f"XLA loop on {threads} threads {ceil['tanh_per_s_all_threads'] / 1e9:.2f} G/s; "
          f"activation ceiling used: {act / 1e9:.2f} G/s; per CPU-second: fp32 GEMM "
          f"{ceil['gemm_float32_flops_per_cpu_s'] / 1e9:.0f} GFLOP, tanh {ceil['tanh_per_cpu_s'] / 1e9:.2f} G",
          flush=True)
    results = {"machine": info, "threads": threads, "ceilings": ceil, "activation_ceiling": act,
               "args": vars(args), "fp32": [], "fp64": []}
    if not args.no_fp32:
        contenders = [c for c in (args.contenders.split(",") if args.contenders else CONTENDERS)
                      if have_torch or not c.startswith("torch")]
        grid = GRID if not args.only else [tuple(int(v) for v in r.split(",")) for r in args.only.split(";")]
        hdr = (f"{'n, d, N':>17} | {'mfld steps/s (min-max)':>24} | {'x numpy':>17} | {'x torch naive':>17} | "
               f"{'x torch analytic':>17} | {'x unfused':>17} | {'x XLA path':>17} | {'GEMM %':>6} | "
               f"{'act %':>5} | load")
        print(f"\nfp32, {threads} threads; ratios: median over rounds (range)\n{hdr}\n{'-' * len(hdr)}", flush=True)
        for row in grid:
            n, d, N = row
            r = bench_row(args, row, contenders)
            sps = r["steps_per_s"]
            m = sps.get("mfld")
            r["gemm_share"] = None if m is None else 4 * n * d * N * m["median"] / ceil["gemm_float32_flops"]
            r["activation_share"] = None if m is None else 2 * n * N * m["median"] / act
            r["ratios"] = {c: ratio(sps, "mfld", c) for c in contenders if c != "mfld"}
            cps = r["steps_per_cpu_s"]
            mc = cps.get("mfld")
            r["ratios_cpu"] = {c: ratio(cps, "mfld", c) for c in contenders if c != "mfld"}
            gemm_cpu = ceil["gemm_float32_flops_per_cpu_s"]
            r["gemm_share_cpu"] = None if mc is None else 4 * n * d * N * mc["median"] / gemm_cpu
            r["activation_share_cpu"] = None if mc is None else 2 * n * N * mc["median"] / ceil["tanh_per_cpu_s"]
            results["fp32"].append(r)
            ld = r["load"]
            mtxt = "-" if m is None else f"{m['median']:.1f} ({m['min']:.1f}-{m['max']:.1f})"
            gemm_txt = "-" if m is None else f"{100 * r['gemm_share']:.0f}"
            act_txt = "-" if m is None else f"{100 * r['activation_share']:.0f}"
            print(f"{n:>5},{d:>4},{N:>7} | {mtxt:>24} | {fmt_ratio(r['ratios'].get('numpy')):>17} | "
                  f"{fmt_ratio(r['ratios'].get('torch_naive')):>17} | "
                  f"{fmt_ratio(r['ratios'].get('torch_analytic')):>17} | "
                  f"{fmt_ratio(r['ratios'].get('mfld_unfused')):>17} | "
                  f"{fmt_ratio(r['ratios'].get('mfld_xla')):>17} | "
                  f"{gemm_txt:>6} | {act_txt:>5} | "
                  f"avg {ld['load_avg_before']:.1f}->{ld['load_avg_after']:.1f} foreign {ld['foreign_load']:.2f}"
                  f"{'' if r['publishable'] else ' LOADED'}", flush=True)
            if threads == 1 and mc is not None:  # CPU time: robust to other processes on one core
                print(f"{'(CPU time)':>17} | {mc['median']:>24.1f} | "
                      f"{fmt_ratio(r['ratios_cpu'].get('numpy')):>17} | "
                      f"{fmt_ratio(r['ratios_cpu'].get('torch_naive')):>17} | "
                      f"{fmt_ratio(r['ratios_cpu'].get('torch_analytic')):>17} | "
                      f"{fmt_ratio(r['ratios_cpu'].get('mfld_unfused')):>17} | "
                      f"{fmt_ratio(r['ratios_cpu'].get('mfld_xla')):>17} | "
                      f"{100 * r['gemm_share_cpu']:>6.0f} | {100 * r['activation_share_cpu']:>5.0f} |", flush=True)
    if not args.no_fp64:
        grid = FP64_GRID if not args.fp64_only else [(1024, 10, int(v)) for v in args.fp64_only.split(",")]
        hdr = f"{'N':>7} | {'mfld64 steps/s (min-max)':>26} | {'numpy64 steps/s':>24} | {'x numpy64':>17} | load"
        print(f"\nfp64 (n = 1024, d = 10), {threads} threads\n{hdr}\n{'-' * len(hdr)}", flush=True)
        for row in grid:
            r = bench_row(args, row, FP64_CONTENDERS, "float64")
            sps = r["steps_per_s"]
            r["ratios"] = {"numpy64": ratio(sps, "mfld64", "numpy64")}
            r["ratios_cpu"] = {"numpy64": ratio(r["steps_per_cpu_s"], "mfld64", "numpy64")}
            results["fp64"].append(r)
            ld = r["load"]
            cols = ["-" if c not in sps else f"{sps[c]['median']:.1f} ({sps[c]['min']:.1f}-{sps[c]['max']:.1f})"
                    for c in FP64_CONTENDERS]
            print(f"{row[2]:>7} | {cols[0]:>26} | {cols[1]:>24} | {fmt_ratio(r['ratios']['numpy64']):>17} | "
                  f"avg {ld['load_avg_before']:.1f}->{ld['load_avg_after']:.1f} foreign {ld['foreign_load']:.2f}"
                  f"{'' if r['publishable'] else ' LOADED'}"
                  + (f"; CPU time x {fmt_ratio(r['ratios_cpu']['numpy64'])}" if threads == 1 else ""), flush=True)
    results["wall_s"] = time.perf_counter() - t_start
    print(f"\nwall time {results['wall_s']:.0f} s; rows marked LOADED ran with a foreign load above "
          f"{args.max_load} and are not publishable", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


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
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, env=env)
    print(out.stdout.strip() or out.stderr[-2000:])


def _md_ratio(r):
    return "-" if r is None else f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})"


def report(path):
    """Markdown tables of a results file (the wall-time table; with one thread also CPU time)."""
    with open(path) as f:
        res = json.load(f)
    c = res["ceilings"]
    T = res["threads"]
    max_load = res.get("args", {}).get("max_load", 0.5)  # publishable by the current rule
    print(f"Ceilings ({T} thread(s), median of the rounds): fp32 GEMM {c['gemm_float32_flops'] / 1e9:.0f} "
          f"GFLOP/s, fp64 GEMM {c['gemm_float64_flops'] / 1e9:.0f} GFLOP/s, tanh {c['tanh_per_s'] / 1e9:.2f} "
          f"G/s per core; per CPU-second: fp32 GEMM {c['gemm_float32_flops_per_cpu_s'] / 1e9:.0f} GFLOP, "
          f"tanh {c['tanh_per_cpu_s'] / 1e9:.2f} G.\n")
    kinds = [("wall", "steps_per_s", "ratios", "gemm_share", "activation_share")]
    if T == 1:
        kinds.append(("CPU time", "steps_per_cpu_s", "ratios_cpu", "gemm_share_cpu", "activation_share_cpu"))
    for label, rate, rat, gs, acts in kinds:
        print(f"fp32, {T} thread(s), {label}: median over rounds (min-max)\n")
        unit = "s" if label == "wall" else "CPU-s"
        print(f"| n, d, N | mfld steps/{unit} | x NumPy | x naive torch | x analytic torch | x unfused | x XLA path "
              "| GEMM share | activation share | foreign load | publishable |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in res["fp32"]:
            m = r[rate].get("mfld")
            mt = "-" if m is None else f"{m['median']:.3g} ({m['min']:.3g}-{m['max']:.3g})"
            share = "-" if r.get(gs) is None else f"{100 * r[gs]:.0f} %"
            act = "-" if r.get(acts) is None else f"{100 * r[acts]:.0f} %"
            print(f"| {r['n']}, {r['d']}, {r['N']} | {mt} | {_md_ratio(r[rat].get('numpy'))} | "
                  f"{_md_ratio(r[rat].get('torch_naive'))} | {_md_ratio(r[rat].get('torch_analytic'))} | "
                  f"{_md_ratio(r[rat].get('mfld_unfused'))} | {_md_ratio(r[rat].get('mfld_xla'))} | "
                  f"{share} | {act} | {r['load']['foreign_load']:.2f} | "
                  f"{'yes' if publishable(r['load'], max_load) else 'no (LOADED)'} |")
        print()
    if res["fp64"]:
        for label, rate, rat, _, _ in kinds:
            print(f"fp64 (n = 1024, d = 10), {T} thread(s), {label}\n")
            unit = "s" if label == "wall" else "CPU-s"
            print(f"| N | mfld64 steps/{unit} | NumPy64 steps/{unit} | x NumPy64 | foreign load | publishable |")
            print("|---|---|---|---|---|---|")
            for r in res["fp64"]:
                cols = []
                for c in FP64_CONTENDERS:
                    v = r[rate].get(c)
                    cols.append("-" if v is None else f"{v['median']:.3g} ({v['min']:.3g}-{v['max']:.3g})")
                print(f"| {r['N']} | {cols[0]} | {cols[1]} | {_md_ratio(r[rat].get('numpy64'))} | "
                      f"{r['load']['foreign_load']:.2f} | "
                      f"{'yes' if publishable(r['load'], max_load) else 'no (LOADED)'} |")
            print()


def main():
    args = parse()
    if args.report:
        report(args.report)
        return
    if args.child:
        spec = json.loads(args.child)
        fn = child_contender if spec["kind"] == "contender" else child_ceiling
        print(json.dumps(fn(spec)), flush=True)
    elif args.memory_check:
        memory_check()
    else:
        main_parent(args)


if __name__ == "__main__":
    main()
