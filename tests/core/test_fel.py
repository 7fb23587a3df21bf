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


def _published_permutation(seed, layer, task, n):
    """The documented formula the harness's published results were produced with."""
    if task == 0:
        return np.arange(n)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), layer), task)
    return np.asarray(jax.random.permutation(key, n))


@pytest.mark.parametrize("seed", [0, 3])
def test_module_permutations_are_the_published_ones(seed):
    x = jax.random.normal(jax.random.key(9), (2, 3, 20))
    for layer in (0, 4):
        fel = rgo_jax.FEL(layer=layer, seed=seed)
        linen = rgo_jax.LinenFEL(layer=layer, seed=seed)
        for task in (0, 1, 6):
            want = np.asarray(x)[..., _published_permutation(seed, layer, task, 20)]
            np.testing.assert_array_equal(fel(x, task), want)
            np.testing.assert_array_equal(linen.apply({}, x, task), want)
            np.testing.assert_array_equal(rgo_jax.permute_features(x, seed, layer, task), want)
    assert fel.layer == 4  # the id stays readable


class _Net(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 6, rngs=rngs)
        self.fel = rgo_jax.FEL(layer=2, seed=5)

    def __call__(self, x, task):
        return self.fel(self.lin(x), task)


def test_nnx_model_with_fel_round_trips_flax_serialization_and_orbax(tmp_path):
    import flax.serialization

    ocp = pytest.importorskip("orbax.checkpoint")  # the bench extra

    model = _Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 3))
    want = model(x, 3)
    # flax.serialization: msgpack of the pure state dict (fails on a typed key).
    pure = getattr(nnx, "to_pure_dict", lambda s: s.to_pure_dict())  # newer / older flax
    data = flax.serialization.to_bytes(pure(nnx.state(model)))
    other = _Net(nnx.Rngs(1))
    state = nnx.state(other)
    nnx.replace_by_pure_dict(state, flax.serialization.from_bytes(pure(state), data))
    nnx.update(other, state)
    np.testing.assert_array_equal(other(x, 3), want)
    # Orbax StandardCheckpointer into an abstract model.
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(tmp_path / "model", nnx.state(model))
    ckptr.wait_until_finished()
    graph, abstract = nnx.split(nnx.eval_shape(lambda: _Net(nnx.Rngs(2))))
    restored = nnx.merge(graph, ckptr.restore(tmp_path / "model", abstract))
    np.testing.assert_array_equal(restored(x, 3), want)
    assert nnx.state(model, rgo_jax.FELKey)["fel"]["key"][...].dtype == jnp.uint32


class _Block(nnx.Module):
    def __init__(self, layer, key):
        self.lin = nnx.Linear(8, 8, rngs=nnx.Rngs(params=key))
        self.fel = rgo_jax.FEL(layer=layer, seed=4)

    def __call__(self, x, task):
        return self.fel(jax.nn.relu(self.lin(x)), task)


@pytest.mark.slow
def test_stacked_fel_layers_under_vmap_and_scan_get_their_own_permutations():
    layers = 3
    blocks = nnx.vmap(lambda i, k: _Block(i, k))(
        jnp.arange(layers), jax.random.split(jax.random.key(0), layers)
    )
    x = jax.random.normal(jax.random.key(1), (5, 8))
    task = 2

    @nnx.scan(in_axes=(nnx.Carry, 0, None), out_axes=nnx.Carry)
    def run(h, block, task):
        return block(h, task)

    out = nnx.jit(lambda b, x, t: run(x, b, t))(blocks, x, jnp.int32(task))
    # Independent reference: the same stack unrolled in NumPy with the published formula.
    kernel = np.asarray(blocks.lin.kernel[...])
    bias = np.asarray(blocks.lin.bias[...])
    h = np.asarray(x)
    perms = [_published_permutation(4, i, task, 8) for i in range(layers)]
    assert len({tuple(p) for p in perms}) == layers
    for i in range(layers):
        h = np.maximum(h @ kernel[i] + bias[i], 0.0)[:, perms[i]]
    np.testing.assert_allclose(out, h, rtol=1e-5, atol=1e-6)
    # nnx.vmap over the stack: each layer permutes with its own id.
    per_layer = nnx.vmap(lambda f, x: f(x, task), in_axes=(0, None))(blocks.fel, x)
    for i in range(layers):
        np.testing.assert_array_equal(per_layer[i], np.asarray(x)[:, perms[i]])
