"""Numerical safety of the RLS update: P stays finite and positive definite for any finite
vectors and alpha, bfloat16 storage stays positive definite, counters saturate, and
integer dtypes are refused. Every reference is the float64 closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgo_jax
from rgo_jax import _rls
from tests.helpers import random_vectors


def closed_form_svd(vectors: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha (alpha I + V^T V)^-1`` in float64 through the SVD of ``V``: accurate to float64
    resolution of ``|P| = 1`` even where ``alpha I + V^T V`` is too ill-conditioned to invert.
    """
    v = np.asarray(vectors, np.float64)
    _, sig, wt = np.linalg.svd(v, full_matrices=True)
    s2 = np.zeros(v.shape[1])
    s2[: len(sig)] = sig**2
    return (wt.T * (alpha / (alpha + s2))) @ wt


def _low_rank(rng, n, d, rank, norm):
    """``n`` vectors in a ``rank``-dimensional subspace, each of length ``norm``."""
    v = rng.normal(size=(n, rank)) @ rng.normal(size=(rank, d))
    return v / np.linalg.norm(v, axis=1, keepdims=True) * norm


def _assert_safe(p):
    p = np.asarray(p, np.float64)
    assert np.all(np.isfinite(p))
    assert np.array_equal(p, p.T)
    assert np.linalg.eigvalsh(p).min() > 0


@pytest.mark.parametrize("method", ["block", "sequential"])
@pytest.mark.slow
def test_issue_example_keeps_p_finite_positive_definite_and_accurate(method):
    # alpha / |v|^2 = 1e-8 is below float32 resolution: the plain recursion went to Inf/NaN.
    v = np.random.default_rng(0).normal(size=(200, 64)) * 1e3 / 8
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((64, 2))})
    s = rgo_jax.update_projection(state, {"w": jnp.asarray(v, jnp.float32)}, 0.01, method=method)
    _assert_safe(s.p["w"])
    expected = closed_form_svd(v.astype(np.float32), 0.01)
    assert np.max(np.abs(np.asarray(s.p["w"], np.float64) - expected)) < 1e-8
    assert int(s.num_vectors) == 200 and int(s.skipped) == 0


# (vector length, alpha, accurate): alpha / |v|^2 from 1e-48 to 1e28. Float32 reaches the
# closed form where alpha / |v|^2 >= 1e-8 or <= 1e-20 (benchmarks/rls_accuracy.py); in
# between P is only kept finite and positive definite.
EXTREMES = [
    (1e20, 1e-8, True),  # v^T P v overflows float32
    (1e20, 1e4, True),
    (1e-12, 1e-8, True),
    (1e-12, 1e4, True),
    (3.0, 1e-6, True),  # realistic vectors, alpha 1e-6: both plain kernels failed
    (1e3, 1e-8, False),
]


@pytest.mark.parametrize(("norm", "alpha", "accurate"), EXTREMES)
@pytest.mark.parametrize("method", ["block", "sequential"])
@pytest.mark.slow
def test_finite_vectors_never_destroy_p(method, norm, alpha, accurate):
    rng = np.random.default_rng(1)
    d = 24
    v = _low_rank(rng, 3 * 40, d, 10, norm).astype(np.float32)
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((d, 3))})
    for chunk in np.split(v, 3):  # three tasks
        state = rgo_jax.update_projection(state, {"w": chunk}, alpha, method=method)
        _assert_safe(state.p["w"])
    assert int(state.num_vectors) == 120 and int(state.skipped) == 0
    if accurate:
        # P depends on alpha / |v|^2 only: the reference from unit vectors cannot overflow.
        expected = closed_form_svd(v.astype(np.float64) / norm, alpha / norm**2)
        assert np.max(np.abs(np.asarray(state.p["w"], np.float64) - expected)) < 1e-5


@pytest.mark.slow
def test_normal_regime_is_bit_identical_to_the_fast_kernels():
    rng = np.random.default_rng(2)
    v = random_vectors(rng, 40, 24)
    p0 = jnp.eye(24)[None]
    for method, kernel in (("block", rgo_jax.rls_block), ("sequential", rgo_jax.rls_sequential)):
        state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((24, 3))})
        got = rgo_jax.update_projection(state, {"w": v}, 0.01, method=method).p["w"]
        want, _ = kernel(p0, jnp.asarray(v)[:, None], 0.01)
        assert np.array_equal(np.asarray(got), np.asarray(want[0]))  # the fast kernel's P


def test_square_root_kernel_matches_the_rank_one_recursion():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 8))
    p = a @ a.T / 8 + 0.1 * np.eye(8)
    v = rng.normal(size=(5, 8))
    expected = p.copy()
    for x in v:  # Algorithm 1, literally, in float64
        u = expected @ x
        expected = expected - np.outer(u, u) / (0.3 + x @ u)
    got = _rls.rls_square_root(jnp.asarray(p[None], jnp.float32), jnp.asarray(v[:, None]), 0.3)
    np.testing.assert_allclose(np.asarray(got[0], np.float64), expected, rtol=1e-4, atol=1e-6)


def test_a_non_finite_p_is_refused_and_counted():
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((24, 3))})
    state = state._replace(p={"w": state.p["w"].at[2, 3].set(jnp.nan)})
    out = rgo_jax.update_projection(state, {"w": jnp.ones((40, 24))}, 0.1)
    assert int(out.num_vectors) == 0 and int(out.skipped) == 40  # the whole update refused
    np.testing.assert_array_equal(out.p["w"], state.p["w"])


def test_cholesky_and_positive_definite_check():
    chol = jax.jit(lambda m: _rls._cholesky(m, jnp.float32(1e-30)))
    ok = jax.jit(_rls.is_positive_definite)
    q = np.linalg.qr(np.random.default_rng(4).normal(size=(40, 40)))[0]  # 40: padded panels
    spd = (q * np.geomspace(1, 1e-5, 40)) @ q.T
    low, least = chol(jnp.asarray(spd, jnp.float32))
    low = np.asarray(low, np.float64)
    np.testing.assert_allclose(low @ low.T, spd, atol=1e-6)
    assert np.array_equal(low, np.tril(low)) and float(least) > 0
    assert bool(ok(jnp.asarray(spd, jnp.float32))) and bool(ok(jnp.eye(40)))
    m = np.eye(40, dtype=np.float32)
    m[33, 33] = -1e-3
    assert not bool(ok(jnp.asarray(m)))
    m[33, 33] = np.nan
    assert not bool(ok(jnp.asarray(m)))


@pytest.mark.slow
def test_bfloat16_p_stays_positive_definite_over_many_tasks():
    # Correlated vectors sharing directions across tasks: the bfloat16 rounding of P used to
    # leave negative eigenvalues that later tasks amplified.
    rng = np.random.default_rng(5)
    d = 32
    basis = rng.normal(size=(12, d))
    state = rgo_jax.scale_by_rgo(dtype=jnp.bfloat16).init({"w": jnp.zeros((d, 2))})
    seen = []
    for _ in range(12):
        v = (np.abs(rng.normal(size=(50, 12))) @ basis / np.sqrt(d)).astype(np.float32)
        seen.append(v)
        state = rgo_jax.update_projection(state, {"w": v}, 0.01)
        assert state.p["w"].dtype == jnp.bfloat16
        p16 = np.asarray(state.p["w"].astype(jnp.float32), np.float64)
        assert np.array_equal(p16, p16.T)
        assert np.linalg.eigvalsh(p16).min() > 0
    # Still the RGO projection: protected directions are (nearly) frozen.
    exact = closed_form_svd(np.concatenate(seen), 0.01)
    assert np.max(np.abs(p16 - exact)) < 0.05


def test_counters_saturate_instead_of_wrapping():
    big = np.iinfo(np.int32).max
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((24, 3))})
    state = state._replace(num_vectors=jnp.int32(big - 3), skipped=jnp.int32(big - 1))
    v = np.ones((40, 24), np.float32)
    v[0, 0] = np.nan
    out = rgo_jax.update_projection(state, {"w": v}, 0.1)
    assert int(out.num_vectors) == big and int(out.skipped) == big
    assert int(_rls.saturating_add(jnp.int32(5), jnp.int32(7))) == 12


def test_integer_dtypes_are_refused_naming_the_leaf():
    with pytest.raises(TypeError, match="dtype of P must be floating.*int32"):
        rgo_jax.scale_by_rgo(dtype=jnp.int32)
    with pytest.raises(TypeError, match="parameter 'layer/kernel' has dtype int32"):
        rgo_jax.rgo(0.1).init({"layer": {"kernel": jnp.zeros((4, 2), jnp.int32)}})
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((4, 2))})
    state = state._replace(p={"w": jnp.eye(4, dtype=jnp.int32)})
    with pytest.raises(TypeError, match="P of 'w' has dtype int32"):
        rgo_jax.update_projection(state, {"w": jnp.ones((3, 4))}, 0.1)
