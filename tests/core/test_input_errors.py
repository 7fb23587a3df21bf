"""Bad inputs to the optimizer core get a clear error naming the problem, never a silent
wraparound or a library-internal traceback."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgo_jax


@pytest.mark.parametrize("task", [2**31, 2**32 + 3, np.int64(2**32 + 3)])
def test_fel_task_ids_beyond_int32_are_refused_not_wrapped(task):
    with pytest.raises(ValueError, match=r"FEL task id must be below 2\*\*31"):
        rgo_jax.fel_permutation(jax.random.key(0), 0, task, 8)


def test_the_largest_fel_task_id_still_works():
    perm = rgo_jax.fel_permutation(jax.random.key(0), 0, 2**31 - 1, 8)
    assert sorted(perm.tolist()) == list(range(8))


@pytest.mark.parametrize(
    "layer, kind, message",
    [("a", TypeError, "an integer"), (1.5, TypeError, "an integer"), (-1, ValueError, "non-neg")],
)
def test_fel_layer_must_be_a_non_negative_integer(layer, kind, message):
    with pytest.raises(kind, match=f"FEL layer id must be {message}"):
        rgo_jax.FEL(layer=layer)


def _linear(params, x):
    return x @ params["w"]


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0], [0, 2**20]])
def test_curvature_labels_outside_the_logits_are_refused(labels):
    params = {"w": jnp.ones((4, 3))}
    x = jnp.ones((2, 4))
    with pytest.raises(ValueError, match="outside the 3 logits"):
        rgo_jax.curvature_vectors(_linear, params, x, jnp.asarray(labels))


def test_curvature_labels_inside_the_logits_still_work():
    params = {"w": jnp.ones((4, 3))}
    out = rgo_jax.curvature_vectors(_linear, params, jnp.ones((2, 4)), jnp.asarray([0, 2]))
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(out))


# The core's input checks: zero vectors, a fractional block size, a non-positive alpha array,
# a leaf without input features.


def test_zero_vectors_are_a_clear_error_or_a_no_op():
    st = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((4, 2))})
    try:
        out = rgo_jax.update_projection(st, {"w": jnp.zeros((0, 4))}, 0.01)
    except ValueError as err:
        assert "0 vectors" in str(err) or "n = 0" in str(err) or "no vectors" in str(err)
    else:
        np.testing.assert_array_equal(np.asarray(out.p["w"]), np.eye(4))


def test_a_fractional_block_size_is_a_clear_error():
    st = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((4, 2))})
    with pytest.raises(ValueError, match="block_size"):
        rgo_jax.update_projection(st, {"w": jnp.ones((3, 4))}, 0.01, block_size=1.5)


@pytest.mark.parametrize("alpha", [-1.0, 0.0, np.nan])
def test_an_alpha_array_that_is_not_positive_is_refused(alpha):
    st = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((4, 2))})
    with pytest.raises(ValueError, match="alpha"):
        rgo_jax.update_projection(st, {"w": jnp.ones((3, 4))}, jnp.asarray(alpha))


def test_a_leaf_without_inputs_gets_a_message_naming_its_shape():
    # A (0, 3) kernel has no input features: today init accepts it with a (0, 0) P and the
    # first update blames "another layout/project_biases".
    params = {"w": jnp.zeros((0, 3))}
    tx = rgo_jax.scale_by_rgo()
    with pytest.raises(ValueError, match=r"'w'.*\(0, 3\)"):
        tx.update(params, tx.init(params), params)
