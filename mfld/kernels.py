"""Compiled CPU kernels for the drift of a tanh network with thin features (d <= 8).

At small d the drift is bound by the activation, not by the GEMMs (inner dimension p = d + 1):
XLA evaluates it as separate passes over each block -- the thin ``dot``, tanh, the GEMVs --
and with two threads splits every pass, so it ran at about half of what the cores' tanh
throughput allows (docs/performance.md). ``mfld/csrc/tanh_sums.cc`` computes the two
particle sums of :func:`mfld.network.interaction` in one pass each, z = w . x and tanh in
registers, no (N, m) array, one tanh per pair and pass:

    forward:  F_j = sum_i a_i tanh(w_i . x_j)
    backward: G_i = sum_j u_j tanh(w_i . x_j),  H_i = sum_j u_j (1 - tanh^2) x_j

They are XLA FFI custom calls (``jax.ffi``), so they live inside the compiled step loops,
under ``shard_map`` (each device sums its own particles; the forward sums are ``psum``-ed as
before) and under ``vmap`` (sweeps: one call per member). Results are bit-identical for any
thread count (the chunking depends on the shapes only) and equal the XLA path up to the
order of the float32 sums and tanh's last-ulp rounding (tests/test_kernels.py).

When they apply (:func:`applies`): CPU backend, float32, the registry's ``tanh``, p <= 9,
the extension built (``pip install`` compiles it; without a C++ compiler the install goes on
without it), and the environment variable ``MFLD_KERNELS`` not ``0``. Otherwise the drift
takes the XLA path. ``env.json`` of a run records :func:`status`.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.machinery
import os
from pathlib import Path

#: Largest feature count p (with the bias) the kernels are compiled for.
MAX_FEATURES = 9
#: Set to "0" to use the XLA path everywhere (e.g. to compare).
ENV_SWITCH = "MFLD_KERNELS"
_TARGETS = {"mfld_tanh_forward": "MfldTanhForward", "mfld_tanh_backward": "MfldTanhBackward"}


def library_path() -> Path | None:
    """The compiled extension next to this module (``mfld/_tanh_sums*.so``), or ``None``."""
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_tanh_sums{suffix}"
        if path.is_file():
            return path
    return None


@functools.cache
def _registered() -> str | None:
    """Register the FFI targets once; ``None`` on success, else why not."""
    import jax

    if jax.default_backend() != "cpu":
        return f"backend {jax.default_backend()} (CPU only)"
    path = library_path()
    if path is None:
        return "extension not built (no C++ compiler at install time?)"
    try:
        lib = ctypes.CDLL(str(path))
        for name, symbol in _TARGETS.items():
            jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    except Exception as e:  # noqa: BLE001 -- any failure means: use the XLA path
        return f"could not load {path.name}: {e}"
    try:
        _self_test()
    except Exception as e:  # noqa: BLE001 -- e.g. a jaxlib whose FFI refuses the handlers
        return f"self-test failed: {e}"
    return None


def _self_test():
    """One tiny forward call against NumPy (a jaxlib that refuses the handlers fails here, once,
    instead of inside a run)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    w = np.linspace(-1.0, 1.0, 2 * 19, dtype=np.float32).reshape(19, 2)
    a = np.linspace(0.5, 1.5, 19, dtype=np.float32)
    x = np.array([[0.3, 1.0], [-2.0, 1.0]], np.float32)
    with jax.ensure_compile_time_eval():  # status() is often first asked while tracing a step
        out = jax.ffi.ffi_call("mfld_tanh_forward", jax.ShapeDtypeStruct((2,), jnp.float32))(w, a, x)
    ref = a.astype(np.float64) @ np.tanh(w.astype(np.float64) @ x.T.astype(np.float64))
    if not np.allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5):
        raise RuntimeError(f"forward sums {np.asarray(out)} != {ref}")


def status() -> str:
    """``"on"`` or why the kernels are off (recorded in a run's env.json)."""
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        return f"off ({ENV_SWITCH}=0)"
    why = _registered()
    return "on" if why is None else f"off ({why})"


def applies(activation, x) -> bool:
    """Whether :func:`tanh_sums_forward` / :func:`tanh_sums_backward` take this drift: the
    registry's tanh, float32 features ``x`` of width p <= :data:`MAX_FEATURES`, kernels on."""
    import jax.numpy as jnp

    from mfld.activations import ACTIVATIONS

    return (activation == ACTIVATIONS["tanh"] and x.dtype == jnp.float32
            and x.shape[-1] <= MAX_FEATURES and status() == "on")


def _require():
    why = _registered()
    if why is not None:
        raise RuntimeError(f"mfld's compiled kernels are not available: {why}")


def tanh_sums_forward(w, a, x):
    """F_j = sum_i a_i tanh(w_i . x_j): ``w (N, p)``, ``a (N,)``, ``x (m, p)`` -> ``(m,)``."""
    import jax
    import jax.numpy as jnp

    _require()
    out = jax.ShapeDtypeStruct((x.shape[0],), jnp.float32)
    return jax.ffi.ffi_call("mfld_tanh_forward", out, vmap_method="sequential")(w, a, x)


def tanh_sums_backward(w, x, u):
    """G_i = sum_j u_j tanh(w_i . x_j), H_i = sum_j u_j (1 - tanh^2(w_i . x_j)) x_j:
    ``w (N, p)``, ``x (m, p)``, ``u (m,)`` -> ``(G (N,), H (N, p))``."""
    import jax
    import jax.numpy as jnp

    _require()
    n, p = w.shape
    outs = (jax.ShapeDtypeStruct((n,), jnp.float32), jax.ShapeDtypeStruct((n, p), jnp.float32))
    return jax.ffi.ffi_call("mfld_tanh_backward", outs, vmap_method="sequential")(w, x, u)
