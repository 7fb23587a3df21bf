"""The optimizer state checkpoints with Orbax and flax.serialization for every layout kind."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import serialization

import rgo_jax
from rgo_jax import layouts

# Every P is 4 x 4: one RLS bucket per consolidation (the leaves differ in their values).
PARAMS = {
    "body": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
    "head": {"kernel": jnp.ones((4, 4)), "bias": jnp.ones(4)},
}
LAYOUTS = {
    "default": {},
    "project_biases_false": {"project_biases": False},
    "none_rule": {"layout": layouts.layout_rules([(r"^head/", None)])},
    "layout_tree": {
        "layout": {
            "body": {"kernel": "dense", "bias": None},
            "head": {"kernel": None, "bias": "bias"},
        }
    },
    "input_projected": {"input_projected": r"body/kernel$", "project_biases": False},
}


def _grads(seed):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), PARAMS)


def _trained_state(kw):
    """An RGO + Adam state after a step and a consolidation (nothing trivial left)."""
    tx = optax.chain(rgo_jax.scale_by_rgo(**kw), optax.adam(1e-2))
    state = tx.init(PARAMS)
    _, state = tx.update(_grads(0), state, PARAMS)
    rng = np.random.default_rng(1)
    vecs = {
        "body": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(6, 4))},
        "head": {"kernel": rng.normal(size=(6, 4)), "bias": rng.normal(size=(6, 4))},
    }
    state = rgo_jax.consolidate(state, jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), vecs))
    return tx, state


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.slow
def test_orbax_round_trip_and_next_update_is_bit_identical(kind, tmp_path):
    tx, state = _trained_state(LAYOUTS[kind])
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "state", state)
    ckptr.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tx.init(PARAMS))
    restored = ckptr.restore(tmp_path / "state", target)
    chex.assert_trees_all_equal_structs(restored, state)
    chex.assert_trees_all_equal(restored, state)
    u_ref, s_ref = tx.update(_grads(2), state, PARAMS)
    u_out, s_out = tx.update(_grads(2), restored, PARAMS)
    chex.assert_trees_all_equal(u_out, u_ref)
    chex.assert_trees_all_equal(s_out, s_ref)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
@pytest.mark.slow
def test_flax_serialization_round_trip(kind):
    tx, state = _trained_state(LAYOUTS[kind])
    restored = serialization.from_bytes(tx.init(PARAMS), serialization.to_bytes(state))
    chex.assert_trees_all_equal_structs(restored, state)
    chex.assert_trees_all_equal(restored, state)
    restored = serialization.from_state_dict(tx.init(PARAMS), serialization.to_state_dict(state))
    chex.assert_trees_all_equal(
        tx.update(_grads(3), restored, PARAMS)[0], tx.update(_grads(3), state, PARAMS)[0]
    )


@pytest.mark.slow
def test_unprojected_leaves_hold_optax_empty_node():
    _, state = _trained_state(LAYOUTS["project_biases_false"])
    (rstate,) = rgo_jax.rgo_states(state)
    assert rstate.p["body"]["bias"] == optax.MaskedNode()
    assert not [x for x in jax.tree.leaves(state) if np.size(x) == 0]  # no zero-size arrays


@pytest.mark.slow
def test_vector_count_is_not_mistaken_for_adams_step_count():
    _, state = _trained_state({})
    # Adam's step counter is the only "count"; the RGO field says what it counts.
    assert int(optax.tree.get(state, "count")) == 1
    assert int(optax.tree.get(state, "num_vectors")) == 6
