"""How much memory this process may use, and a run's memory estimate (no JAX, no NumPy needed).

:func:`available_memory` is the smallest of the memory the kernel reports as available
(``MemAvailable`` of ``/proc/meminfo``) and what the process's control group still allows
(cgroup v2 ``memory.max - memory.current``, or v1 ``limit - usage``). ``MFLD_MEMORY_LIMIT``
(bytes, optional suffix K/M/G/T) overrides it -- for a scheduler's allocation the kernel
does not know about, and for tests. ``None`` when nothing is known (then no check refuses).

The run estimate (:func:`run_memory`) is deliberately rough (a factor of two either way): it
exists to refuse sizes that cannot possibly fit (1e12 particles, 1e11 test points) before
anything is written, not to predict the peak.

:func:`release_freed_memory` hands the pages that the C heap holds free back to the kernel
(glibc's ``malloc_trim``): float64 blocks below glibc's mmap threshold (up to 32 MB) that a
certificate frees stay in the process otherwise, and count in its resident set.
"""

from __future__ import annotations

import functools
import os

ENV_LIMIT = "MFLD_MEMORY_LIMIT"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _parse_bytes(text: str) -> int | None:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and not t[-1:].isdigit() else ""
    try:
        value = float(t[:-1] if unit else t)
    except ValueError:
        return None
    return int(value * _UNITS[unit]) if value >= 0 else None


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    if not text or text == "max":
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    limit, usage = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is None:  # cgroup v1
        limit = _read_int("/sys/fs/cgroup/memory/memory.limit_in_bytes")
        usage = _read_int("/sys/fs/cgroup/memory/memory.usage_in_bytes")
        if limit is not None and limit >= 1 << 60:  # v1 "no limit"
            limit = None
    if limit is None:
        return None
    return max(limit - (usage or 0), 0)


def available_memory() -> int | None:
    """Bytes this process may still allocate (see the module docstring), or None if unknown."""
    env = os.environ.get(ENV_LIMIT)
    if env:
        parsed = _parse_bytes(env)
        if parsed is not None:
            return parsed
    known = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(known) if known else None


def human(n: float) -> str:
    """``1.5 GiB``-style size."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.3g} PiB"  # pragma: no cover


def run_memory(*, n_particles: int, dim_w: int, itemsize: int, n_data: int, n_test: int, n_inputs: int,
               certify_samples: int = 0, drift_budget: int = 1 << 30) -> dict[str, int]:
    """Rough bytes of a run's largest allocations, by what causes them (the keys name the
    config fields): ``model.n_particles`` (the particles in the run's precision, the step's
    copies, noise and gradients, float64 copies for records and checkpoints, plus the drift's
    blocked temporaries up to ``drift_budget``), ``data`` (train and test split, float64 on the
    host and a copy in the run's precision), ``record.certify_samples`` (the Monte Carlo
    nodes of the certificates, float64)."""
    d_particle = dim_w + 1
    particles = n_particles * d_particle * (6 * itemsize + 3 * 8)
    temporaries = min(drift_budget, 3 * n_particles * max(n_data, 1) * itemsize)
    data = (n_data + n_test) * (n_inputs + 2) * (8 + itemsize)
    certs = certify_samples * (dim_w + 8) * 8
    return {"model.n_particles": int(particles + temporaries), "data": int(data),
            "record.certify_samples": int(certs)}


def release_freed_memory() -> bool:
    """Return the free pages of the C heap to the kernel (glibc ``malloc_trim(0)``, which also
    releases free pages inside the heap, not only at its top). glibc keeps freed allocations
    below its mmap threshold (which grows up to 32 MB as large blocks are freed) for reuse, so
    a computation made of many such blocks -- a certificate at N = 10^7 -- leaves 150-250 MB
    resident that the next compiled step, whose buffers are mapped afresh, cannot use. True if
    memory was released; False where there is no ``malloc_trim`` (not glibc) or nothing to
    release. Costs a walk of the heap (milliseconds): call it after large computations only."""
    trim = _find_malloc_trim()
    return bool(trim(0)) if trim is not None else False


@functools.cache
def _find_malloc_trim():
    """glibc's ``malloc_trim``, looked up once, or None where there is none."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (macOS, musl without it, Windows)
        return None
