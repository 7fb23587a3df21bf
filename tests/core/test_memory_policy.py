"""Which leaves get a P: the memory guard at init and the transformer policy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rgo_jax
from rgo_jax import layouts
from tests.helpers import built_in_one_program


def test_an_embedding_table_over_the_budget_is_refused_at_init():
    params = {"embed": {"embedding": jax.ShapeDtypeStruct((50000, 64), jnp.float32)}}
    # 50000^2 float32 = 10_000_000_000 bytes: named with its shape, bytes and the override.
    with pytest.raises(
        ValueError,
        match=r"'embed/embedding' of shape \(50000, 64\) would get a P of shape "
        r"\(50000, 50000\) \(10000000000 bytes.*max_p_bytes=1073741824.*None layout",
    ):
        rgo_jax.scale_by_rgo().init(params)
    small = {"w": jnp.ones((40, 2))}  # 40 * 40 * 4 = 6400 bytes
    with pytest.raises(ValueError, match=r"'w'.*6400 bytes.*max_p_bytes=6000"):
        rgo_jax.rgo(0.1, max_p_bytes=6000).init(small)
    rgo_jax.rgo(0.1, max_p_bytes=6400).init(small)  # exactly at the budget is allowed
    # bfloat16 storage halves the bytes the guard counts.
    rgo_jax.rgo(0.1, max_p_bytes=3200, dtype=jnp.bfloat16).init(small)


def test_the_total_over_the_budget_is_refused_naming_the_largest():
    params = {"a": jnp.ones((30, 2)), "b": jnp.ones((20, 2)), "c": jnp.ones(3)}
    total = 4 * (30 * 30 + 20 * 20 + 3 * 3)
    with pytest.raises(ValueError, match=rf"{total} bytes.*max_total_bytes=5000.*'a' \(30, 30\)"):
        rgo_jax.scale_by_rgo(max_total_bytes=5000).init(params)
    rgo_jax.scale_by_rgo(max_total_bytes=total).init(params)


def test_scalar_leaves_are_unprojected_and_3d_leaves_need_a_layout():
    state = rgo_jax.scale_by_rgo().init({"t": jnp.ones(()), "w": jnp.ones((3, 2))})
    assert state.p["t"] == optax.MaskedNode() and state.p["w"].shape == (3, 3)
    g, _ = rgo_jax.scale_by_rgo().update({"t": jnp.full((), 2.0), "w": jnp.ones((3, 2))}, state)
    assert float(g["t"]) == 2.0
    with pytest.raises(ValueError, match=r"'k' of shape \(3, 4, 5\).*Pass layout="):
        rgo_jax.scale_by_rgo().init({"k": jnp.ones((3, 4, 5))})


class _Block(nnx.Module):
    def __init__(self, d, rngs):
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(
            num_heads=2, in_features=d, qkv_features=d, decode=False, rngs=rngs
        )
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = nnx.Sequential(
            nnx.Linear(d, 2 * d, rngs=rngs), jax.nn.gelu, nnx.Linear(2 * d, d, rngs=rngs)
        )

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _Transformer(nnx.Module):
    def __init__(self, vocab, d, classes, rngs):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.block = _Block(d, rngs)
        self.head = nnx.Linear(d, classes, rngs=rngs)

    def __call__(self, tokens):
        return self.head(jnp.mean(self.block(self.embed(tokens)), axis=1))


@pytest.mark.slow
def test_transformer_policy_gives_p_to_the_block_kernels_only():
    model = built_in_one_program(
        lambda: _Transformer(vocab=50000, d=8, classes=8, rngs=nnx.Rngs(0))
    )
    # The rank-only default refuses the embedding's 50000 x 50000 P (and the 3-D attention
    # kernels); the documented policy picks the leaves.
    with pytest.raises(ValueError):
        nnx.Optimizer(model, rgo_jax.rgo(0.1), wrt=nnx.Param)
    rules = layouts.layout_rules(layouts.TRANSFORMER_RULES)
    opt = nnx.Optimizer(model, rgo_jax.rgo(0.1, layout=rules), wrt=nnx.Param)
    (state,) = rgo_jax.rgo_states(nnx.as_pure(opt.opt_state))
    shapes = {
        rgo_jax.layouts.path_str(path): p.shape
        for path, p in jax.tree_util.tree_flatten_with_path(state.p)[0]
    }
    assert shapes == {
        "block/attn/key/kernel": (8, 8),
        "block/attn/query/kernel": (8, 8),
        "block/attn/value/kernel": (8, 8),
        "block/attn/out/kernel": (8, 8),  # heads * head_dim
        "block/attn/out/bias": (8, 8),
        "block/mlp/layers/0/kernel": (8, 8),
        "block/mlp/layers/0/bias": (16, 16),
        "block/mlp/layers/2/kernel": (16, 16),
        "block/mlp/layers/2/bias": (8, 8),
        "head/kernel": (8, 8),
        "head/bias": (8, 8),  # 8 classes: two P sizes (8, 16), two RLS buckets
    }
    # A task boundary and a projected step run through the whole model.
    rng = np.random.default_rng(0)
    xs = jnp.asarray(rng.integers(0, 50000, size=(3, 4, 5)), jnp.int32)
    ys = jnp.asarray(rng.integers(0, 8, size=(3, 4)), jnp.int32)
    rgo_jax.nnx.consolidate(opt, model, xs, ys, reduced=False)
    (state,) = rgo_jax.rgo_states(nnx.as_pure(opt.opt_state))
    assert int(state.num_vectors) == 3
    p = np.asarray(state.p["block"]["attn"]["query"]["kernel"])
    assert not np.allclose(p, np.eye(8), atol=1e-4)
    before = np.asarray(model.embed.embedding[...])

    def loss(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(xs[0]), ys[0]).mean()

    @nnx.jit  # the step as one program (eagerly, each of its operations compiles on its own)
    def train_step(opt, model):
        opt.update(model, nnx.grad(loss)(model))

    train_step(opt, model)
    assert not np.array_equal(before, model.embed.embedding[...])  # unprojected, still trained
