"""XLA compiler settings of mfld's compiled programs (the step loops, sweeps, records).

On CPU, XLA hands matrix products to YNNPACK. By default each dot is its own YNNPACK call
and the elementwise work around it (the activation after the forward GEMM, ``sigma' * u``
before the backward GEMM, the accumulation after it) runs as separate XLA loops, each a
full pass over a (particles x data-block) array in memory. With
``xla_cpu_experimental_ynn_fusion_type = LIBRARY_FUSION_TYPE_DOT`` YNNPACK fuses those
elementwise producers and consumers into the dot and works tile by tile in cache, which
made the step faster at every benchmark size (docs/performance.md has the measurements;
``benchmarks/bench_step.py`` measures it in every run, column ``x unfused``).
``LIBRARY_FUSION_TYPE_ELTWISE`` (all elementwise ops to YNNPACK) is not used: it splits the
noise draw's ``erf_inv`` into many passes and changes its bits.

Effect on results: float32 ``tanh`` inside a fused dot is YNNPACK's (a different rounding,
within a few ulp; docs/performance.md); float64 programs are unchanged (YNNPACK does not take
them). A program compiles the same way every time, so runs stay bit-identical on one machine.

The options are decided at the first compilation, once the backend is known: only on CPU,
only if this jaxlib accepts the option (checked by compiling a tiny program), and not when
the environment variable ``MFLD_XLA_DOT_FUSION=0`` is set. ``env.json`` of a run records
:func:`compiler_options`.

Where the drift is evaluated in particle blocks (thin features, huge N; see
:func:`mfld.blocking.plan_chunks`) the fusion made the step slower (each block's small GEMMs
and the recomputed activations gain nothing from it), so the step programs are compiled
without it there (:func:`mfld.blocking.dot_fusion_pays`).
"""

from __future__ import annotations

import functools
import os

#: Options added to every compiled mfld program on CPU.
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
#: Set to "0" to compile without :data:`CPU_COMPILER_OPTIONS` (e.g. to compare).
ENV_SWITCH = "MFLD_XLA_DOT_FUSION"


@functools.cache
def compiler_options() -> dict:
    """The XLA options mfld compiles with on this backend (``{}`` if none apply)."""
    import jax
    import jax.numpy as jnp

    if os.environ.get(ENV_SWITCH, "1").strip() == "0" or jax.default_backend() != "cpu":
        return {}
    try:
        jax.jit(lambda m: jnp.tanh(m @ m), compiler_options=CPU_COMPILER_OPTIONS).lower(
            jnp.ones((2, 2), jnp.float32)).compile()
    except Exception:  # an older/newer jaxlib without the option: compile as XLA does
        return {}
    return dict(CPU_COMPILER_OPTIONS)


class _LazyJit:
    """``jax.jit(fun, **kwargs)`` with :func:`compiler_options`, built at the first use (the
    backend must not be started at import time: see :func:`mfld.sharding.configure_cpu`).
    With ``fuse_if``, calls for which ``fuse_if(*args, **kwargs)`` is false (a static
    property of the arguments' shapes) go to a second jitted function without the options."""

    def __init__(self, fun, fuse_if, kwargs):
        self._fun, self._fuse_if, self._kwargs = fun, fuse_if, kwargs
        self._jitted = {}
        functools.update_wrapper(self, fun)

    def _get(self, fused=True):
        if fused not in self._jitted:
            import jax

            opts = compiler_options() if fused else {}
            self._jitted[fused] = jax.jit(self._fun, compiler_options=opts or None, **self._kwargs)
        return self._jitted[fused]

    def __call__(self, *args, **kwargs):
        fused = True if self._fuse_if is None else bool(self._fuse_if(*args, **kwargs))
        return self._get(fused)(*args, **kwargs)

    def _cache_size(self):
        return sum(f._cache_size() for f in self._jitted.values())

    def __getattr__(self, name):  # lower, trace, ... of the (fused) jitted function
        if name.startswith("__") or name in ("_fun", "_fuse_if", "_kwargs", "_jitted"):
            raise AttributeError(name)
        return getattr(self._get(), name)


def jit(fun=None, *, fuse_if=None, **kwargs):
    """``jax.jit`` with mfld's compiler options (see the module docstring). Usable as
    ``jit(f, static_argnames=...)`` or as a decorator. ``fuse_if(*args, **kwargs) -> bool``:
    compile without the options for calls where it is false (the drift's particle blocks,
    :func:`mfld.blocking.dot_fusion_pays`)."""
    if fun is None:
        return functools.partial(jit, fuse_if=fuse_if, **kwargs)
    return _LazyJit(fun, fuse_if, kwargs)
