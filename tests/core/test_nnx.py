"""rgo_jax.nnx: the one-call task boundary of an nnx.Optimizer, and the compiled vectors."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rgo_jax
from rgo_jax import layouts
from rgo_jax.bench.models import MLP


def _batches(rng, nb, b, d, classes):
    xs = jnp.asarray(rng.normal(size=(nb, b, d)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, classes, size=(nb, b)), jnp.int32)
    return xs, ys


@pytest.mark.slow
def test_consolidate_equals_vectors_then_consolidate_with_the_optimizers_layout():
    model = MLP(6, (8,), 4, rngs=nnx.Rngs(0))  # FEL sites, called as model(x, task)
    tx = rgo_jax.rgo(0.1, project_biases=False)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    xs, ys = _batches(np.random.default_rng(0), 5, 4, 6, 4)
    mask = jnp.ones(4, bool)
    # The long way: split, a logits function, the same layout repeated, consolidate.
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def logits(p, x):
        return nnx.merge(graph, p, rest)(x, 1)

    vecs = rgo_jax.curvature_vectors(
        logits, nnx.as_pure(params), xs, ys, class_mask=mask, project_biases=False
    )
    expected = rgo_jax.consolidate(tx.init(nnx.as_pure(params)), vecs, 0.05)
    # The one call: layout and project_biases come from the optimizer's state.
    rgo_jax.nnx.consolidate(opt, model, xs, ys, 1, alpha=0.05, class_mask=mask)
    (got,) = rgo_jax.rgo_states(nnx.as_pure(opt.opt_state))
    (want,) = rgo_jax.rgo_states(expected)
    assert int(got.num_vectors) == 5
    assert got.p["hidden"][0]["bias"] == optax.MaskedNode()
    chex.assert_trees_all_close(got.p, want.p, rtol=1e-5, atol=1e-7)
    assert not np.allclose(got.p["head"]["kernel"], np.eye(8), atol=1e-3)


class _Block(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(5, 5, rngs=rngs)

    def __call__(self, x):
        return jax.nn.tanh(self.lin(x))


class _ScanNet(nnx.Module):
    """Three stacked blocks applied by nnx.scan, then a head (5 outputs, 3 classes used)."""

    def __init__(self, rngs):
        @nnx.split_rngs(splits=3)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return _Block(rngs)

        self.blocks = make(rngs)
        self.head = nnx.Linear(5, 5, rngs=rngs)  # every P 5 x 5: one RLS bucket

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(block, h):
            return block(h)

        return self.head(body(self.blocks, x))


@pytest.mark.slow
def test_consolidate_works_with_nnx_scan_and_stacked_layouts():
    rules = layouts.layout_rules(
        [(r"^blocks/.*kernel", layouts.stacked(layouts.DENSE)), (r"^blocks/", None)]
    )
    xs, ys = _batches(np.random.default_rng(1), 4, 6, 5, 3)
    out = {}
    for reduced in (True, False):
        model = _ScanNet(nnx.Rngs(0))
        opt = nnx.Optimizer(model, rgo_jax.rgo(0.1, layout=rules), wrt=nnx.Param)
        rgo_jax.nnx.consolidate(opt, model, xs, ys, reduced=reduced)
        (state,) = rgo_jax.rgo_states(nnx.as_pure(opt.opt_state))
        out[reduced] = state.p
    assert out[True]["blocks"]["lin"]["kernel"].shape == (3, 5, 5)  # one P per stacked layer
    assert out[True]["blocks"]["lin"]["bias"] == optax.MaskedNode()
    chex.assert_trees_all_close(out[True], out[False], rtol=1e-5, atol=1e-7)
    p = np.asarray(out[True]["blocks"]["lin"]["kernel"])
    assert not np.allclose(p[0], p[2])  # layers differ
    # A training step with the consolidated optimizer runs through the scanned model.
    model = _ScanNet(nnx.Rngs(0))
    opt = nnx.Optimizer(model, rgo_jax.rgo(0.1, layout=rules), wrt=nnx.Param)
    rgo_jax.nnx.consolidate(opt, model, xs, ys)

    @nnx.jit
    def step(model, opt, x, y):
        loss = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()  # noqa: E731
        opt.update(model, nnx.grad(loss)(model))

    step(model, opt, xs[0], ys[0])
    assert bool(jnp.all(jnp.isfinite(model.blocks.lin.kernel[...])))


def test_consolidate_needs_an_rgo_optimizer():
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    xs, ys = _batches(np.random.default_rng(0), 2, 4, 3, 2)
    with pytest.raises(ValueError, match="no RGOState"):
        rgo_jax.nnx.consolidate(opt, model, xs, ys)


def test_a_python_loop_over_batches_compiles_once():
    """The README pattern (one call per batch) reuses one compiled function (issue 14)."""
    model = MLP(6, (8,), 4, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    traces = []

    def logits(p, x, task):
        traces.append(1)
        return nnx.merge(graph, p, rest)(x, task)

    xs, ys = _batches(np.random.default_rng(2), 6, 4, 6, 4)
    for i in range(6):
        rgo_jax.curvature_vectors(logits, params, xs[i], ys[i], jnp.int32(i % 2))
    first = len(traces)
    for i in range(6):
        rgo_jax.curvature_vectors(logits, params, xs[i], ys[i], jnp.int32(i % 2))
    assert len(traces) == first <= 3  # traced for the first call only (shape, grad, vmap)
