"""Compiled CPU kernels for the drift of a tanh network (XLA FFI custom calls).

Thin features (p = d + 1 <= 9, :func:`applies`). At small d the drift is bound by the
activation, not by the GEMMs: XLA evaluates it as separate passes over each block -- the thin
``dot``, tanh, the GEMVs -- and with two threads splits every pass, so it ran at about half of
what the cores' tanh throughput allows (docs/performance.md). ``mfld/csrc/tanh_sums.cc``
computes the two particle sums of :func:`mfld.network.interaction` in one pass each, z = w . x
and tanh in registers, no (N, m) array, one tanh per pair and pass:

    forward:  F_j = sum_i a_i tanh(w_i . x_j)
    backward: G_i = sum_j u_j tanh(w_i . x_j),  H_i = sum_j u_j (1 - tanh^2) x_j

Wide features (p > 9, :func:`applies_wide`). The drift is two GEMMs per data block, and what
XLA adds to them -- YNNPACK's tanh in the forward GEMM, the GEMVs ``a S`` and ``S u``, ``1 -
S^2`` -- cost a quarter of the step at (4096, 100, 16384). ``mfld/csrc/tanh_blocks.cc`` does
each block in two calls whose GEMMs carry that work in their register tiles
(:func:`tanh_block_forward`: S = tanh(w x^T) and F = a S; :func:`tanh_block_backward`: G += S u
and H += (1 - S^2)(u x), in place); :func:`mfld.network.interaction` scans them over blocks of
:func:`block_rows` rows.

They are XLA FFI custom calls (``jax.ffi``), so they live inside the compiled step loops,
under ``shard_map`` (each device sums its own particles; the forward sums are ``psum``-ed as
before) and under ``vmap`` (sweeps: one call per member). Results are bit-identical for any
thread count (the chunking depends on the shapes only) and equal the XLA path up to the
order of the float32 sums and tanh's last-ulp rounding (tests/test_kernels.py).

When they apply: CPU backend, float32, the registry's ``tanh``, the extension built (``pip
install`` compiles it; without a C++ compiler the install goes on without it), and the
environment variable ``MFLD_KERNELS`` not ``0``. Otherwise the drift takes the XLA path.
``env.json`` of a run records :func:`status`.
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
#: Data rows of a block of the wide-feature kernels are a multiple of this (their register tile).
BLOCK_ROWS_MULTIPLE = 16
#: Most data rows per block of the wide-feature kernels (the fastest of 64-1024 measured at
#: (4096, 100, 16384), docs/performance.md). A constant, not the thread-dependent plan of the
#: XLA path, so wide runs too are bit-identical for any thread count.
BLOCK_ROWS = 256
_TARGETS = {"mfld_tanh_forward": "MfldTanhForward", "mfld_tanh_backward": "MfldTanhBackward",
            "mfld_tanh_block_forward": "MfldTanhBlockForward",
            "mfld_tanh_block_backward": "MfldTanhBlockBackward"}


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
        xb = np.zeros((16, 2), np.float32)
        xb[:2] = x
        fb, sb = jax.ffi.ffi_call("mfld_tanh_block_forward", (jax.ShapeDtypeStruct((16,), jnp.float32),
                                                              jax.ShapeDtypeStruct((19, 16), jnp.float32)))(w, a, xb)
    ref = a.astype(np.float64) @ np.tanh(w.astype(np.float64) @ x.T.astype(np.float64))
    for name, val in (("forward sums", out), ("block forward sums", np.asarray(fb)[:2])):
        if not np.allclose(np.asarray(val), ref, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"{name} {np.asarray(val)} != {ref}")


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


def applies_wide(activation, x) -> bool:
    """Whether :func:`tanh_block_forward` / :func:`tanh_block_backward` take the data blocks of
    this drift: the registry's tanh, float32 features ``x`` of width p > :data:`MAX_FEATURES`
    (where :func:`applies` stops), kernels on."""
    import jax.numpy as jnp

    from mfld.activations import ACTIVATIONS

    return (activation == ACTIVATIONS["tanh"] and x.dtype == jnp.float32
            and x.shape[-1] > MAX_FEATURES and status() == "on")


def block_rows(rows: int) -> int:
    """Rows per block of the wide-feature kernels for ``rows`` data rows: the fewest blocks of
    at most :data:`BLOCK_ROWS` rows, balanced, rounded up to a multiple of
    :data:`BLOCK_ROWS_MULTIPLE` (the padding rows carry u = 0)."""
    rows = max(1, int(rows))
    blocks = -(-rows // BLOCK_ROWS)
    per = -(-rows // blocks)
    return -(-per // BLOCK_ROWS_MULTIPLE) * BLOCK_ROWS_MULTIPLE


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


def tanh_block_forward(w, a, x):
    """One data block, forward: ``S_ij = tanh(w_i . x_j)`` and ``F_j = sum_i a_i S_ij``:
    ``w (N, p)``, ``a (N,)``, ``x (b, p)`` with b a multiple of :data:`BLOCK_ROWS_MULTIPLE`
    -> ``(F (b,), S (N, b))``."""
    import jax
    import jax.numpy as jnp

    _require()
    n, b = w.shape[0], x.shape[0]
    outs = (jax.ShapeDtypeStruct((b,), jnp.float32), jax.ShapeDtypeStruct((n, b), jnp.float32))
    return jax.ffi.ffi_call("mfld_tanh_block_forward", outs, vmap_method="sequential")(w, a, x)


def tanh_block_backward(s, x, u, g, h):
    """One data block, backward, accumulated: ``(g + S u, h + (1 - S^2) (u x))``: ``s (N, b)``
    from :func:`tanh_block_forward`, ``x (b, p)``, ``u (b,)``, ``g (N,)``, ``h (N, p)``. The
    sums are added into ``g`` and ``h`` in place (their buffers are aliased to the outputs)."""
    import jax

    _require()
    outs = (jax.ShapeDtypeStruct(g.shape, g.dtype), jax.ShapeDtypeStruct(h.shape, h.dtype))
    return jax.ffi.ffi_call("mfld_tanh_block_backward", outs, vmap_method="sequential",
                            input_output_aliases={3: 0, 4: 1})(s, x, u, g, h)
