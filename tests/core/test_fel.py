"""FEL: a pure, task-keyed bijection on the feature axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import rgo_jax


def test_deterministic_bijection_differs_by_task_and_layer():
    key = jax.random.key(7)
    n = 64
    perms = {}
    for layer in range(3):
        for task in range(1, 4):
            p = np.asarray(rgo_jax.fel_permutation(key, layer, task, n))
            np.testing.assert_array_equal(np.sort(p), np.arange(n))
            again = np.asarray(rgo_jax.fel_permutation(jax.random.key(7), layer, task, n))
            np.testing.assert_array_equal(p, again)
            perms[layer, task] = p
    distinct = {tuple(p) for p in perms.values()}
    assert len(distinct) == len(perms)
    other_seed = np.asarray(rgo_jax.fel_permutation(jax.random.key(8), 0, 1, n))
    assert not np.array_equal(other_seed, perms[0, 1])


def test_first_task_identity_by_default_and_optional():
    key = jax.random.key(0)
    np.testing.assert_array_equal(rgo_jax.fel_permutation(key, 2, 0, 16), np.arange(16))
    p = rgo_jax.fel_permutation(key, 2, 0, 16, identity_first_task=False)
    assert not np.array_equal(p, np.arange(16))


def test_permute_and_inverse_on_last_axis():
    x = jax.random.normal(jax.random.key(1), (2, 3, 3, 10))
    key = jax.random.key(3)
    y = rgo_jax.permute_features(x, key, 1, 5)
    perm = np.asarray(rgo_jax.fel_permutation(key, 1, 5, 10))
    np.testing.assert_array_equal(y, np.asarray(x)[..., perm])
    np.testing.assert_array_equal(rgo_jax.permute_features(y, key, 1, 5, inverse=True), x)


def test_traced_task_under_jit_matches_eager():
    key = jax.random.key(4)
    x = jnp.arange(24.0).reshape(2, 12)
    f = jax.jit(lambda t: rgo_jax.permute_features(x, key, 0, t))
    for t in range(4):
        np.testing.assert_array_equal(f(jnp.int32(t)), rgo_jax.permute_features(x, key, 0, t))


def test_nnx_module_has_no_params_and_matches_function():
    fel = rgo_jax.FEL(layer=2, seed=11)
    assert jax.tree.leaves(nnx.state(fel, nnx.Param)) == []
    assert len(jax.tree.leaves(nnx.state(fel, rgo_jax.FELKey))) == 1
    x = jax.random.normal(jax.random.key(0), (4, 9))
    expected = rgo_jax.permute_features(x, jax.random.key(11), 2, 3)
    np.testing.assert_array_equal(fel(x, 3), expected)
    np.testing.assert_array_equal(nnx.jit(lambda m, t: m(x, t))(fel, jnp.int32(3)), expected)
    linen = rgo_jax.LinenFEL(layer=2, seed=11)
    variables = linen.init(jax.random.key(0), x, 3)
    assert jax.tree.leaves(variables) == []
    np.testing.assert_array_equal(linen.apply(variables, x, 3), expected)


def test_bad_ids_are_rejected():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="task id must be non-negative"):
        rgo_jax.fel_permutation(key, 0, -1, 4)
    with pytest.raises(TypeError, match="task id must be an integer"):
        rgo_jax.fel_permutation(key, 0, 1.5, 4)
    with pytest.raises(TypeError, match="task id must have an integer dtype"):
        jax.jit(lambda t: rgo_jax.fel_permutation(key, 0, t, 4))(jnp.float32(1))
    with pytest.raises(ValueError, match="layer id must be non-negative"):
        rgo_jax.fel_permutation(key, -2, 1, 4)
    with pytest.raises(ValueError, match="scalar"):
        rgo_jax.fel_permutation(key, 0, jnp.array([1, 2]), 4)
    with pytest.raises(ValueError, match="num_features"):
        rgo_jax.fel_permutation(key, 0, 1, 0)
