"""A-GEM baseline: the projection over the whole tree, and the episodic memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rgo_jax.baselines import AGEMState, agem, agem_project


def _tree(rng, scale=1.0):
    return {
        "a": {"kernel": jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32)},
        "b": jnp.asarray(scale * rng.normal(size=(5,)), jnp.float32),
    }


def _flat(t) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])


def _conflicting(rng):
    """A pair with <g, g_ref> < 0 over the whole tree (but not leaf by leaf)."""
    g, ref = _tree(rng), _tree(rng)
    ref = jax.tree.map(lambda x, y: y - 2.0 * x, g, ref)
    assert _flat(g) @ _flat(ref) < 0
    return g, ref


def test_conflicting_gradient_is_projected_onto_the_constraint():
    rng = np.random.default_rng(0)
    g, ref = _conflicting(rng)
    out, violated = agem_project(g, ref)
    assert bool(violated)
    fg, fr, fo = _flat(g), _flat(ref), _flat(out)
    assert abs(fo @ fr) < 1e-5 * np.linalg.norm(fg) * np.linalg.norm(fr)
    np.testing.assert_allclose(fo, fg - (fg @ fr) / (fr @ fr) * fr, rtol=1e-5, atol=1e-6)


def test_agreeing_gradient_is_unchanged():
    rng = np.random.default_rng(1)
    g = _tree(rng)
    ref = jax.tree.map(lambda x, y: x + 0.1 * y, g, _tree(rng))
    assert _flat(g) @ _flat(ref) >= 0
    out, violated = agem_project(g, ref)
    assert not bool(violated)
    jax.tree.map(np.testing.assert_array_equal, out, g)
    zero = jax.tree.map(jnp.zeros_like, g)  # a zero reference never projects
    out, violated = agem_project(g, zero)
    assert not bool(violated)
    jax.tree.map(np.testing.assert_array_equal, out, g)


def test_transformation_in_jitted_chain_compiles_once():
    rng = np.random.default_rng(2)
    tx = optax.chain(agem(), optax.sgd(0.5))
    g, ref = _conflicting(rng)
    state = tx.init(g)
    traces = []

    @jax.jit
    def step(g, state, ref):
        traces.append(1)
        return tx.update(g, state, ref_grads=ref)

    upd, state = step(g, state, ref)
    want, _ = agem_project(g, ref)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, -0.5 * w, rtol=1e-6), upd, want)
    upd, state = step(ref, state, ref)  # agrees with itself: unchanged
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, -0.5 * w, rtol=1e-6), upd, ref)
    assert len(traces) == 1
    assert isinstance(state[0], AGEMState)
    assert int(state[0].count) == 2 and int(state[0].num_projected) == 1
    # No reference gradient (first task): plain pass-through.
    upd, _ = tx.update(g, state)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, -0.5 * w), upd, g)


def test_mismatched_reference_names_the_leaf():
    rng = np.random.default_rng(3)
    g = _tree(rng)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        agem_project(g, {"a": g["a"]})
    with pytest.raises(ValueError, match="ref_grads for 'b' have shape"):
        agem_project(g, {"a": g["a"], "b": jnp.zeros(4)})


def test_nnx_optimizer_forwards_ref_grads():
    model = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.chain(agem(), optax.sgd(1.0)), wrt=nnx.Param)
    w0 = np.asarray(model.kernel[...])
    grads = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda _: jnp.array([[1.0], [-1.0]]), grads)
    ref = jax.tree.map(lambda _: jnp.array([[0.0], [1.0]]), grads)
    opt.update(model, grads, ref_grads=ref)
    np.testing.assert_allclose(model.kernel[...], w0 - np.array([[1.0], [0.0]]), atol=1e-7)


def _stream(task: int, n: int):
    x = np.stack([np.full((2,), 100 * task + i, np.float32) for i in range(n)])
    return x, (np.arange(n) + 100 * task).astype(np.int64)
