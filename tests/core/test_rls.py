"""RLS kernels and update_projection against float64 closed forms."""

import jax.numpy as jnp
import numpy as np
import pytest

import rgo_jax
from rgo_jax import layouts
from tests.helpers import closed_form_p, random_vectors


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("alpha", [0.01, 1.0])
@pytest.mark.parametrize("method", ["sequential", "block"])
def test_recursion_matches_closed_form(alpha, method):
    rng = np.random.default_rng(0)
    v = random_vectors(rng, n=60, d=24)
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((24, 5))})
    state = rgo_jax.update_projection(state, {"w": v}, alpha, method=method, block_size=16)
    expected = closed_form_p(v, alpha)
    assert _rel_err(state.p["w"], expected) < 2e-4
    assert int(state.num_vectors) == 60 and int(state.skipped) == 0


def test_rank_one_step_is_the_textbook_formula():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(6, 6))
    p = a @ a.T + np.eye(6)
    v = rng.normal(size=6)
    alpha = 0.3
    expected = p - np.outer(p @ v, v @ p) / (alpha + v @ p @ v)
    got, bad = rgo_jax.rls_step(jnp.asarray(p[None], jnp.float32), jnp.asarray(v[None]), alpha)
    np.testing.assert_allclose(got[0], expected, rtol=1e-4, atol=1e-5)
    assert not bool(bad[0])
    # exact symmetry is preserved
    assert bool(jnp.all(got[0] == got[0].T))


@pytest.mark.slow
def test_block_equals_sequential_steps():
    rng = np.random.default_rng(2)
    k, n, d = 3, 40, 16
    p0 = jnp.broadcast_to(jnp.eye(d), (k, d, d))
    v = jnp.asarray(np.stack([random_vectors(rng, n, d) for _ in range(k)], axis=1))
    seq, _ = rgo_jax.rls_sequential(p0, v, 0.05)
    for b in (1, 7, 40, 64):
        blk, _ = rgo_jax.rls_block(p0, v, 0.05, block_size=b)
        np.testing.assert_allclose(blk, seq, rtol=1e-3, atol=1e-5)


@pytest.mark.slow
def test_bucketed_update_equals_per_leaf_update():
    rng = np.random.default_rng(3)
    params = {"a": jnp.zeros((10, 4)), "b": jnp.zeros((10, 7)), "c": jnp.zeros((6, 3))}
    vecs = {k: random_vectors(rng, 30, v.shape[0]) for k, v in params.items()}
    tx = rgo_jax.scale_by_rgo()
    together = rgo_jax.update_projection(tx.init(params), vecs, 0.1, method="sequential")
    for name in params:
        alone = rgo_jax.update_projection(
            tx.init({name: params[name]}), {name: vecs[name]}, 0.1, method="sequential"
        )
        np.testing.assert_allclose(together.p[name], alone.p[name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            together.p[name], closed_form_p(vecs[name], 0.1), rtol=1e-3, atol=1e-5
        )


def test_stacked_layers_have_independent_projections():
    rng = np.random.default_rng(4)
    num_layers, d_in, d_out, n = 3, 12, 5, 25
    params = {"blocks": jnp.zeros((num_layers, d_in, d_out))}
    tx = rgo_jax.scale_by_rgo(layout={"blocks": layouts.stacked(layouts.DENSE)})
    state = tx.init(params)
    assert state.p["blocks"].shape == (num_layers, d_in, d_in)
    v = np.stack([random_vectors(rng, n, d_in, scale=1 + i) for i in range(num_layers)], 1)
    state = rgo_jax.update_projection(state, {"blocks": v}, 0.2)
    for i in range(num_layers):
        np.testing.assert_allclose(
            state.p["blocks"][i], closed_form_p(v[:, i], 0.2), rtol=1e-3, atol=1e-5
        )
    # Each layer's gradient is projected by its own P.
    g = jnp.asarray(rng.normal(size=(num_layers, d_in, d_out)), jnp.float32)
    out, _ = tx.update({"blocks": g}, state)
    for i in range(num_layers):
        p = np.asarray(state.p["blocks"][i], np.float64)
        expected = d_in / np.trace(p) * p @ np.asarray(g[i])
        np.testing.assert_allclose(out["blocks"][i], expected, rtol=1e-4, atol=1e-5)


def test_non_finite_vector_is_skipped_and_counted():
    rng = np.random.default_rng(5)
    v = random_vectors(rng, 12, 8)
    bad = v.copy()
    bad[4, 2] = np.nan
    params = {"w": jnp.zeros((8, 2)), "b": jnp.zeros(8)}
    tx = rgo_jax.scale_by_rgo()
    # The NaN sits in "w" only; the whole bad batch (index 4) is skipped for "b" too.
    state = rgo_jax.update_projection(tx.init(params), {"w": bad, "b": v}, 0.1)
    keep = np.delete(v, 4, axis=0)
    assert bool(jnp.all(jnp.isfinite(state.p["w"])))
    np.testing.assert_allclose(state.p["w"], closed_form_p(keep, 0.1), rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(state.p["b"], closed_form_p(keep, 0.1), rtol=1e-3, atol=1e-5)
    assert int(state.skipped) == 1 and int(state.num_vectors) == 11
    _, skipped = rgo_jax.rls_step(jnp.eye(8)[None], jnp.full((1, 8), jnp.inf), 0.1)
    assert bool(skipped[0])


def test_update_projection_errors_name_the_leaf():
    tx = rgo_jax.scale_by_rgo()
    state = tx.init({"layer": {"kernel": jnp.zeros((5, 3))}})
    with pytest.raises(ValueError, match=r"layer/kernel.*\(7, 4\)"):
        rgo_jax.update_projection(state, {"layer": {"kernel": jnp.ones((7, 4))}})
    with pytest.raises(ValueError, match="no curvature vectors.*layer/kernel"):
        rgo_jax.update_projection(state, {"other": jnp.ones((1, 5))})
    with pytest.raises(TypeError, match="layer/kernel.*floating"):
        rgo_jax.update_projection(state, {"layer": {"kernel": jnp.ones((2, 5), jnp.int32)}})
    with pytest.raises(ValueError, match="alpha must be positive"):
        rgo_jax.update_projection(state, {"layer": {"kernel": jnp.ones((2, 5))}}, alpha=0.0)
    with pytest.raises(ValueError, match="Unknown RLS method"):
        rgo_jax.update_projection(state, {"layer": {"kernel": jnp.ones((2, 5))}}, method="x")
    with pytest.raises(TypeError, match="consolidate"):
        rgo_jax.update_projection((state,), {})


def test_a_leaf_without_vectors_beside_others_is_an_error_not_a_silent_no_op():
    """Zero vectors for one leaf and some for another once returned the state unchanged
    (every P, the other leaf's included, silently not updated)."""
    tx = rgo_jax.scale_by_rgo()
    state = tx.init({"a": {"kernel": jnp.zeros((5, 3))}, "b": {"kernel": jnp.zeros((7, 2))}})
    rng = np.random.default_rng(3)
    mixed = {"a": {"kernel": jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)}}
    mixed["b"] = {"kernel": jnp.zeros((0, 7), jnp.float32)}
    with pytest.raises(ValueError, match=r"different numbers of vectors \{0, 4\}"):
        rgo_jax.update_projection(state, mixed)
    # No vectors at all: nothing to absorb, the same state.
    empty = {k: {"kernel": jnp.zeros((0, d), jnp.float32)} for k, d in (("a", 5), ("b", 7))}
    assert rgo_jax.update_projection(state, empty) is state


def test_positive_definite_after_many_updates():
    rng = np.random.default_rng(6)
    v = random_vectors(rng, 400, 32, scale=3.0)
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((32, 2))})
    for chunk in np.split(v, 4):
        state = rgo_jax.update_projection(state, {"w": chunk}, 0.01, method="sequential")
    p = np.asarray(state.p["w"], np.float64)
    assert np.array_equal(p, p.T)
    assert np.linalg.eigvalsh(p).min() > 0
    assert _rel_err(p, closed_form_p(v, 0.01)) < 1e-2


def test_update_projection_is_jitted_once_per_structure():
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((6, 2))})
    vec = {"w": jnp.ones((3, 6))}
    rgo_jax.update_projection(state, vec)
    before = rgo_jax._transform._update_program("block")._cache_size()
    rgo_jax.update_projection(state, {"w": 2 * jnp.ones((3, 6))}, 0.5)
    assert rgo_jax._transform._update_program("block")._cache_size() == before


@pytest.mark.parametrize("d, groups", [(70, 1), (100, 2), (640, 4)])
def test_grouped_cholesky_is_the_float64_factor(monkeypatch, d, groups):
    """The positive-definiteness check's factor: block columns in static groups (each group's
    product reads only the rows and columns that can be non-zero) for large P. Lowered
    thresholds so that small matrices take the grouped path."""
    import jax

    from rgo_jax import _rls

    monkeypatch.setattr(_rls, "_MIN_BLOCKS_TO_GROUP", 3)
    monkeypatch.setattr(_rls, "_GROUP_BLOCKS", 2)
    monkeypatch.setattr(_rls, "_GROUPS", 4)
    rng = np.random.default_rng(d)
    a = rng.normal(size=(d, d + 5))
    m = (a @ a.T / d + 0.05 * np.eye(d)).astype(np.float32)
    floor = jnp.float32(1e-30)
    jaxpr = jax.make_jaxpr(_rls._cholesky)(jnp.asarray(m), floor)
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name in ("while", "scan")]
    assert len(loops) == groups
    low, least = _rls._cholesky(jnp.asarray(m), floor)
    ref = np.linalg.cholesky(m.astype(np.float64))
    np.testing.assert_allclose(np.asarray(low), ref, atol=2e-6 * np.abs(ref).max())
    np.testing.assert_allclose(float(least), np.min(np.diag(ref)) ** 2, rtol=1e-4)
    # An indefinite matrix: the smallest pivot (negative, or NaN once the raised pivots
    # overflow the later columns) is not above the floor, and the check says so.
    bad = m.copy()
    bad[d // 2, d // 2] = -1.0
    assert not float(_rls._cholesky(jnp.asarray(bad), jnp.float32(1e-6))[1]) > 1e-6
    assert bool(_rls.is_positive_definite(jnp.asarray(m)))
    assert not bool(_rls.is_positive_definite(jnp.asarray(bad)))
