"""mfld.gibbs: the sigma cache is keyed by the activation object, never by a reused id."""

from __future__ import annotations

import gc
import weakref

import jax.numpy as jnp
import numpy as np

from mfld import gibbs
from mfld.activations import from_callable
from mfld.problem import Problem


def _problem(act):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((12, 1))
    return Problem.create(x, np.sin(2 * x[:, 0]), activation=act, lam=0.5, tau=0.1, bias=False)


def test_a_cached_user_activation_stays_alive_so_its_id_cannot_be_reused():
    # The sigma cache is keyed by the activation object. Keyed by id(fn) (as it was), a user
    # function collected after its evaluation frees its id for the next function CPython
    # allocates there, which would then read the first one's cached sigma values. Here: while
    # its values are cached the activation is alive (the key holds it), so no other object can
    # have its id; once the cache is cleared it is collected (the key does not leak it).
    u = np.linspace(-1.0, 1.0, 12)
    gibbs.clear_cache()
    act = from_callable(lambda z: jnp.tanh(2 * z), name="user")
    spec = gibbs.make_spec(_problem(act))
    assert spec.key[1] is act
    gibbs.evaluate_spec(spec, u, "quadrature")
    alive = weakref.ref(act)
    del act, spec
    gc.collect()
    assert gibbs.cache_size() > 0 and alive() is not None
    gibbs.clear_cache()
    gc.collect()
    assert alive() is None


def test_registered_activations_share_the_cache_across_problems():
    # the same data and a registered activation: the second problem's grid hits the cache
    u = np.linspace(-1.0, 1.0, 12)
    gibbs.clear_cache()
    s1, s2 = gibbs.make_spec(_problem("tanh")), gibbs.make_spec(_problem("tanh"))
    assert s1.key == s2.key
    d1 = gibbs.evaluate_spec(s1, u, "quadrature").D
    n_cached = gibbs.cache_size()
    assert n_cached > 0
    assert gibbs.evaluate_spec(s2, u, "quadrature").D == d1 and gibbs.cache_size() == n_cached
