"""The noise of the dynamics: standard normal draws from (key, step, row).

The noise of step k is row i of ``normal(fold_in(fold_in(key, k), 0), (rows, D))``, with
``key`` the run's ``ParticleState.key``. With JAX's partitionable threefry (the default) row i
depends only on (key, k, i) -- not on the number of rows beyond i, the chunking or the device
count. :func:`threefry_normal` computes the same values as ``jax.random.normal`` with the
Threefry-2x32 hash written out, so that XLA fuses it into one kernel (``tests/test_kernel.py``
checks the equality bit for bit; docs/performance.md has the timings).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def step_noise(step_key, n_rows: int, dim: int, dtype):
    """The standard normal draws of one step: row i of ``normal(fold_in(step_key, 0), (rows, D))``
    with ``step_key = fold_in(key, step)``. One bulk threefry draw; with the partitionable
    threefry (JAX's default) row i depends only on (key, step, i) -- not on the number of
    rows beyond i, the chunking or the device count -- and a sharded draw generates each
    device's rows locally. Column 0 drives ``a``, columns 1.. drive ``w``.

    The values are bit-identical to ``jax.random.normal``; for threefry keys they are computed
    by :func:`threefry_normal` (the hash unrolled into one fused kernel, where JAX lowers it on
    CPU as a 5-iteration loop over full-size arrays; ``tests/test_kernel.py`` checks the
    equality, docs/performance.md has the timings)."""
    key = jax.random.fold_in(step_key, 0)
    if (str(jax.random.key_impl(key)) == "threefry2x32" and jax.config.jax_threefry_partitionable
            and n_rows * dim < 2 ** 32):
        return threefry_normal(key, (n_rows, dim), dtype)
    return jax.random.normal(key, (n_rows, dim), dtype)


_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1, k2, x0, x1):
    """The Threefry-2x32 hash (20 rounds), unrolled: the same function as JAX's
    ``threefry2x32_p`` (Salmon et al. 2011), written out so that XLA fuses it."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = x0 + x1
            x1 = jax.lax.shift_left(x1, np.uint32(r)) | jax.lax.shift_right_logical(x1, np.uint32(32 - r))
            x1 = x0 ^ x1
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


def threefry_normal(key, shape: tuple[int, int], dtype):
    """``jax.random.normal(key, shape, dtype)`` for a threefry key under
    ``jax_threefry_partitionable`` (2-D ``shape`` with fewer than 2^32 entries), bit for bit:
    element (i, j) hashes the counter ``i * shape[1] + j`` (generated flat, then reshaped), the
    two output words are combined (xor for 32-bit floats, concatenated for 64-bit), mapped to a
    uniform in (-1, 1) by the mantissa trick and to a normal by ``sqrt(2) erfinv``, as
    ``jax.random`` does."""
    rows, cols = shape
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.float64):  # other floats: JAX's own path
        return jax.random.normal(key, shape, dtype)
    kd = jax.random.key_data(key)
    # Generated flat and reshaped (free, row-major): XLA CPU vectorises along the minor axis,
    # so erfinv runs faster per element on the flat array (docs/performance.md, "noise").
    counter = jax.lax.iota(jnp.uint32, rows * cols)
    b1, b2 = _threefry2x32(kd[0], kd[1], jnp.zeros_like(counter), counter)
    if dtype == jnp.float64:
        bits = (b1.astype(jnp.uint64) << np.uint64(32)) | b2.astype(jnp.uint64)
        utype, nbits, nmant = jnp.uint64, 64, 52
    else:
        bits, utype, nbits, nmant = b1 ^ b2, jnp.uint32, 32, 23
    one = np.array(1.0, dtype).view(np.dtype(utype))
    fbits = jax.lax.shift_right_logical(bits, utype(nbits - nmant)) | utype(one)
    floats = jax.lax.bitcast_convert_type(fbits, dtype) - np.array(1.0, dtype)
    lo = np.nextafter(np.array(-1.0, dtype), np.array(0.0, dtype), dtype=dtype)
    u = jax.lax.max(lo, floats * (np.array(1.0, dtype) - lo) + lo)
    return (np.array(np.sqrt(2), dtype) * jax.lax.erf_inv(u)).reshape(shape)
