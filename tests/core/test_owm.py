"""OWM baseline: shared RLS kernel, closed form of P, suppression of absorbed inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rgo_jax import _rls
from rgo_jax import layouts as L
from rgo_jax.baselines import OWMState, owm_update, scale_by_owm


def _params():
    return {
        "fc1": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3)},
        "conv": {"kernel": jnp.zeros((2, 2, 2, 4))},  # d = 8
    }


def _closed_form(means: np.ndarray, alpha: float, init_scale: float) -> np.ndarray:
    """``(I / c + sum r r^T / a)^{-1}`` in float64 for ``means [n, d]``."""
    m = np.asarray(means, np.float64)
    d = m.shape[1]
    return np.linalg.inv(np.eye(d) / init_scale + m.T @ m / alpha)


def _steps(rng, n, rows, d):
    return [rng.normal(size=(rows, d)).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("alpha,init_scale", [(1.0, 1.0), (0.5, 1.0), (1.0, 1 / 0.3)])
def test_p_matches_closed_form(alpha, init_scale):
    rng = np.random.default_rng(0)
    tx = scale_by_owm(init_scale=init_scale)
    state = tx.init(_params())
    fc, conv = _steps(rng, 6, 4, 5), _steps(rng, 6, 12, 8)
    for a, b in zip(fc, conv, strict=True):
        state = owm_update(state, {"fc1/kernel": a, "conv/kernel": b}, alpha)
    np.testing.assert_allclose(
        state.p["fc1"]["kernel"],
        _closed_form(np.stack([a.mean(0) for a in fc]), alpha, init_scale),
        rtol=2e-4,
        atol=1e-5,
    )
    np.testing.assert_allclose(
        state.p["conv"]["kernel"],
        _closed_form(np.stack([b.mean(0) for b in conv]), alpha, init_scale),
        rtol=2e-4,
        atol=1e-5,
    )
    assert state.p["fc1"]["bias"] == optax.MaskedNode()  # biases unprojected by default
    assert int(state.count) == 6 and int(state.skipped) == 0


def test_uses_the_shared_rls_kernel(monkeypatch):
    calls = []
    real = _rls.rls_sequential

    def spy(p, v, alpha):
        calls.append((p.shape, v.shape))
        return real(p, v, alpha)

    monkeypatch.setattr(_rls, "rls_sequential", spy)
    params = {"odd": {"kernel": jnp.zeros((7, 2))}}  # a shape no other test traces
    state = scale_by_owm().init(params)
    x = np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)
    new = owm_update(state, {"odd/kernel": x}, 0.7)
    assert calls == [((1, 7, 7), (1, 1, 7))]
    # ... and the result is exactly that kernel's output on the batch-mean input.
    want, _ = real(jnp.eye(7)[None], jnp.asarray(x.mean(0))[None, None], 0.7)
    np.testing.assert_allclose(new.p["odd"]["kernel"], want[0], rtol=1e-6, atol=1e-7)


def test_absorbed_input_directions_are_suppressed():
    rng = np.random.default_rng(2)
    d, m = 6, 3
    basis = np.linalg.qr(rng.normal(size=(d, 2)))[0]  # inputs live in a 2-D subspace
    state = scale_by_owm().init({"w": jnp.zeros((d, m))})
    for _ in range(20):
        x = (rng.normal(size=(8, 2)) + 1.0) @ basis.T
        state = owm_update(state, {"w": x.astype(np.float32)}, 1e-3)
    tx = scale_by_owm()
    g = rng.normal(size=(d, m)).astype(np.float32)
    pg, _ = tx.update({"w": jnp.asarray(g)}, state)
    pg = np.asarray(pg["w"], np.float64)
    # A step P G changes the layer's output on old inputs x by x^T P G: nearly zero.
    old_out = basis.T @ pg
    assert np.linalg.norm(old_out) < 0.03 * np.linalg.norm(basis.T @ g)
    # Directions orthogonal to every absorbed input pass unchanged (P v = v there).
    comp = np.linalg.qr(np.concatenate([basis, rng.normal(size=(d, 4))], 1))[0][:, 2:]
    np.testing.assert_allclose(comp.T @ pg, comp.T @ g, rtol=1e-3, atol=1e-4)


def test_projection_is_p_times_g_without_normalisation():
    rng = np.random.default_rng(3)
    state = scale_by_owm().init(_params())
    state = owm_update(
        state,
        {"fc1/kernel": rng.normal(size=(4, 5)), "conv/kernel": rng.normal(size=(9, 8))},
        0.5,
    )
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), _params())
    out, _ = scale_by_owm().update(g, state)
    p_fc = np.asarray(state.p["fc1"]["kernel"], np.float64)
    np.testing.assert_allclose(out["fc1"]["kernel"], p_fc @ g["fc1"]["kernel"], rtol=1e-5)
    p_cv = np.asarray(state.p["conv"]["kernel"], np.float64)
    g_cv = np.asarray(g["conv"]["kernel"]).reshape(8, 4)  # HWIO -> [kh*kw*cin, cout]
    np.testing.assert_allclose(
        np.asarray(out["conv"]["kernel"]).reshape(8, 4), p_cv @ g_cv, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(out["fc1"]["bias"], g["fc1"]["bias"])


def test_per_position_conv_steps_with_batch_size():
    rng = np.random.default_rng(4)
    b, pos, d = 3, 4, 8
    x = rng.normal(size=(b, pos, d)).astype(np.float32)  # batch-major im2col rows
    state = scale_by_owm().init({"conv": {"kernel": jnp.zeros((2, 2, 2, 4))}})
    new = owm_update(state, {"conv/kernel": x.reshape(b * pos, d)}, 1.0, batch_size=b)
    np.testing.assert_allclose(
        new.p["conv"]["kernel"], _closed_form(x.mean(0), 1.0, 1.0), rtol=2e-4, atol=1e-5
    )
    block = owm_update(
        state, {"conv/kernel": x.reshape(b * pos, d)}, 1.0, batch_size=b, method="block"
    )
    np.testing.assert_allclose(
        block.p["conv"]["kernel"], new.p["conv"]["kernel"], rtol=1e-4, atol=1e-5
    )
    with pytest.raises(ValueError, match="not a multiple of batch_size=5"):
        owm_update(state, {"conv/kernel": x.reshape(b * pos, d)}, 1.0, batch_size=5)


def test_per_leaf_alpha_dict_and_missing_entry():
    rng = np.random.default_rng(5)
    a, c = rng.normal(size=(4, 5)), rng.normal(size=(6, 8))
    state = scale_by_owm().init(_params())
    new = owm_update(
        state, {"fc1/kernel": a, "conv/kernel": c}, {"fc1/kernel": 2.0, "conv/kernel": 0.1}
    )
    np.testing.assert_allclose(
        new.p["fc1"]["kernel"], _closed_form(a.mean(0)[None], 2.0, 1.0), rtol=1e-5
    )
    np.testing.assert_allclose(
        new.p["conv"]["kernel"], _closed_form(c.mean(0)[None], 0.1, 1.0), rtol=1e-4, atol=1e-6
    )
    with pytest.raises(ValueError, match="no entry for projected parameter 'conv/kernel'"):
        owm_update(state, {"fc1/kernel": a, "conv/kernel": c}, {"fc1/kernel": 2.0})
    with pytest.raises(ValueError, match="alpha must be positive"):
        owm_update(state, {"fc1/kernel": a, "conv/kernel": c}, 0.0)


def test_bias_input_is_the_constant_one():
    state = scale_by_owm(project_biases=True).init(
        {"fc": {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}}
    )
    assert state.p["fc"]["bias"].shape == (1, 1)
    for _ in range(4):
        state = owm_update(state, {"fc/kernel": np.ones((2, 2), np.float32)}, 0.5)
    # P = (1 + 4 / 0.5)^-1 = 1/9 for the bias (input 1 at every step).
    np.testing.assert_allclose(state.p["fc"]["bias"], [[1 / 9]], rtol=1e-6)
    g = {"fc": {"kernel": jnp.zeros((2, 3)), "bias": jnp.array([9.0, -18.0, 0.0])}}
    out, _ = scale_by_owm(project_biases=True).update(g, state)
    np.testing.assert_allclose(out["fc"]["bias"], [1.0, -2.0, 0.0], rtol=1e-5)


def test_stacked_layout_one_p_per_layer():
    rng = np.random.default_rng(6)
    tx = scale_by_owm(layout=lambda path, leaf: L.stacked(L.DENSE))
    state = tx.init({"blocks": jnp.zeros((2, 4, 3))})
    assert state.p["blocks"].shape == (2, 4, 4)
    x = rng.normal(size=(2, 5, 4)).astype(np.float32)  # [layers, rows, d]
    new = owm_update(state, {"blocks": x}, 1.0)
    for i in range(2):
        np.testing.assert_allclose(
            new.p["blocks"][i], _closed_form(x[i].mean(0)[None], 1.0, 1.0), rtol=1e-5
        )


def test_non_finite_input_is_skipped():
    state = scale_by_owm().init({"w": jnp.zeros((3, 2))})
    x = np.ones((2, 3), np.float32)
    x[0, 1] = np.nan
    new = owm_update(state, {"w": x}, 1.0)
    np.testing.assert_array_equal(new.p["w"], np.eye(3))
    assert int(new.skipped) == 1 and int(new.count) == 1


def test_bad_inputs_name_the_parameter():
    state = scale_by_owm().init(_params())
    with pytest.raises(ValueError, match="'conv/kernel' has 5 features; its matrix acts on 8"):
        owm_update(state, {"fc1/kernel": np.ones((2, 5)), "conv/kernel": np.ones((2, 5))}, 1.0)
    with pytest.raises(ValueError, match="no input for projected parameter 'conv/kernel'"):
        owm_update(state, {"fc1/kernel": np.ones((2, 5))}, 1.0)
    with pytest.raises(ValueError, match="owm_inputs= was given without owm_alpha"):
        scale_by_owm().update(_params(), state, owm_inputs={})


def test_extra_args_order_in_jitted_chain():
    """``owm_inputs=`` absorbs first, then projects (the reference code's order)."""
    rng = np.random.default_rng(7)
    params = {"fc1": {"kernel": jnp.zeros((5, 3)), "bias": jnp.zeros(3)}}
    tx = optax.chain(optax.identity(), scale_by_owm(), optax.sgd(0.1))
    state = tx.init(params)
    x = jnp.asarray(rng.normal(size=(4, 5)), jnp.float32)
    g = jax.tree.map(lambda p: jnp.ones_like(p), params)

    @jax.jit
    def step(g, state, x):
        return tx.update(g, state, owm_inputs={"fc1/kernel": x}, owm_alpha=0.5)

    upd, new = step(g, state, x)
    p = _closed_form(np.asarray(x).mean(0)[None], 0.5, 1.0)
    np.testing.assert_allclose(upd["fc1"]["kernel"], -0.1 * p @ np.ones((5, 3)), rtol=1e-5)
    np.testing.assert_allclose(new[1].p["fc1"]["kernel"], p, rtol=1e-5)
    # Without inputs the projection uses the stored P and leaves it unchanged.
    upd2, new2 = jax.jit(tx.update)(g, new)
    np.testing.assert_allclose(new2[1].p["fc1"]["kernel"], p, rtol=1e-5)
    # owm_update on the whole chained state reaches the OWMState inside.
    chained = owm_update(state, {"fc1/kernel": x}, 0.5)
    assert isinstance(chained[1], OWMState)
    np.testing.assert_allclose(chained[1].p["fc1"]["kernel"], p, rtol=1e-5)


def test_nnx_optimizer_forwards_owm_inputs():
    model = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.chain(scale_by_owm(), optax.sgd(1.0)), wrt=nnx.Param)
    x = jnp.ones((3, 4))
    w0 = np.asarray(model.kernel[...])
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    opt.update(model, grads, owm_inputs={"kernel": x}, owm_alpha=1.0)
    p = _closed_form(np.ones((1, 4)), 1.0, 1.0)
    # d/dW sum(x W + b) = sum_b x_b (outer) 1 = 3 * ones((4, 2)).
    np.testing.assert_allclose(model.kernel[...], w0 - p @ (3 * np.ones((4, 2))), rtol=1e-5)
    state = nnx.as_pure(opt.opt_state)
    np.testing.assert_allclose(state[0].p["kernel"], p, rtol=1e-6)
