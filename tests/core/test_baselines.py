"""Baselines with the library's real models, and the common optax battery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rgo_jax.baselines import (
    gpm_update_bases,
    owm_update,
    scale_by_gpm,
    scale_by_owm,
)
from rgo_jax.bench._models_util import conv_patches
from rgo_jax.bench.models import MLP


@nnx.jit
def _train_step(model, opt, x, y, task):
    def loss(m):
        z = m(x, task)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], axis=1))

    opt.update(model, nnx.grad(loss)(model))


@nnx.jit
def _logits(model, x, task):
    return model(x, task)


@nnx.jit
def _inputs(model, x, task):
    return model(x, task, return_inputs=True)[1]


def _train(model, opt, x, y, task, steps):
    for _ in range(steps):
        _train_step(model, opt, x, y, jnp.asarray(task))


def _conv(x, kernel, bias):
    dn = ("NHWC", "HWIO", "NHWC")
    return (
        jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=dn)
        + bias[None, None, None, :]
    )


def test_gpm_conv_layout_agrees_with_the_models_im2col():
    """A GPM step leaves a conv layer's outputs on the stored inputs exactly unchanged."""
    rng = np.random.default_rng(0)
    # Images constant along the width: the patches span only part of the 3*3*2 = 18
    # input directions, so the basis is partial and the layer can still learn.
    x_old = jnp.asarray(np.repeat(rng.normal(size=(4, 8, 1, 2)), 8, axis=2), jnp.float32)
    params = {
        "conv": {
            "kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
            "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32),
        }
    }
    patches = conv_patches(x_old, 3, 1, "VALID")  # [4 * 6 * 6, 18], HWIO order
    tx = scale_by_gpm(project_biases=True)
    state = gpm_update_bases(tx.init(params), {("conv", "kernel"): patches}, 1.0)
    assert 0 < int(state.rank["conv"]["kernel"]) < 18
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    pg, _ = tx.update(g, state)
    new = jax.tree.map(lambda p, u: p - 0.5 * u, params, pg)
    before = _conv(x_old, params["conv"]["kernel"], params["conv"]["bias"])
    after = _conv(x_old, new["conv"]["kernel"], new["conv"]["bias"])
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    x_new = jnp.asarray(rng.normal(size=(2, 8, 8, 2)), jnp.float32)
    moved = _conv(x_new, new["conv"]["kernel"], new["conv"]["bias"]) - _conv(
        x_new, params["conv"]["kernel"], params["conv"]["bias"]
    )
    assert float(jnp.abs(moved).max()) > 0.1  # the step did change the layer


@pytest.mark.slow
def test_gpm_keeps_old_task_logits_of_a_model_exactly():
    """Tuple-keyed model inputs, frozen biases, FEL and nnx.Optimizer end to end."""
    rng = np.random.default_rng(3)
    model = MLP(8, (6,), 3, rngs=nnx.Rngs(1))
    x_old = rng.normal(size=(3, 8)).astype(np.float32)  # rank 3 of 8 input directions
    tx = optax.chain(scale_by_gpm(project_biases=True), optax.sgd(0.1))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    inputs = _inputs(model, x_old, 0)  # {("hidden", 0, "kernel"): ..., ("head", "kernel"): ...}
    state = gpm_update_bases(nnx.as_pure(opt.opt_state), dict(inputs), 1.0)
    nnx.update(opt.opt_state, nnx.state(state))
    assert int(state[0].rank["hidden"][0]["kernel"]) == 3
    before_old = np.asarray(_logits(model, x_old, 0))
    x_new = rng.normal(size=(5, 8)).astype(np.float32)
    y_new = jnp.asarray(rng.integers(0, 3, size=5))
    before_new = np.asarray(_logits(model, x_new, 1))
    _train(model, opt, jnp.asarray(x_new), y_new, 1, steps=5)
    assert np.abs(np.asarray(_logits(model, x_new, 1)) - before_new).max() > 1e-2
    np.testing.assert_allclose(_logits(model, x_old, 0), before_old, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_owm_nearly_keeps_old_task_logits_of_an_mlp():
    rng = np.random.default_rng(1)
    model = MLP(8, (6,), 3, rngs=nnx.Rngs(1))
    x_old = rng.normal(size=(3, 8)).astype(np.float32)
    tx = optax.chain(scale_by_owm(project_biases=True), optax.sgd(0.1))
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    state = nnx.as_pure(opt.opt_state)
    for i in range(3):  # one OWM step per old example (batches of one)
        inputs = _inputs(model, x_old[i : i + 1], 0)
        state = owm_update(state, dict(inputs), 1e-4)
    nnx.update(opt.opt_state, nnx.state(state))
    before_old = np.asarray(_logits(model, x_old, 0))
    x_new = rng.normal(size=(5, 8)).astype(np.float32)
    y_new = jnp.asarray(rng.integers(0, 3, size=5))
    before_new = np.asarray(_logits(model, x_new, 1))
    _train(model, opt, jnp.asarray(x_new), y_new, 1, steps=5)
    moved_new = np.abs(np.asarray(_logits(model, x_new, 1)) - before_new).max()
    moved_old = np.abs(np.asarray(_logits(model, x_old, 0)) - before_old).max()
    assert moved_new > 1e-2
    assert moved_old < 0.02 * moved_new
