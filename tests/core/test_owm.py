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


class _ConvMLP(nnx.Module):
    """A 1x1 conv (its im2col patches are the pixels) and two dense layers; batch 3 is
    below fc1's width (input-side product) and not below the head's (output side)."""

    def __init__(self):
        rngs = nnx.Rngs(0)
        self.conv = nnx.Conv(2, 3, kernel_size=(1, 1), rngs=rngs)  # HWIO [1, 1, 2, 3]: d = 2
        self.fc1 = nnx.Linear(12, 7, rngs=rngs)
        self.head = nnx.Linear(7, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.conv(x)).reshape(x.shape[0], -1)
        h1 = jnp.tanh(self.fc1(h))
        inputs = {"conv/kernel": x.reshape(-1, x.shape[-1]), "fc1/kernel": h, "head/kernel": h1}
        return self.head(h1), inputs


def _conv_mlp_problem():
    from rgo_jax.nnx import use_input_projection  # noqa: PLC0415

    # Shapes only (Flax's initialisers compile per shape), the values drawn here.
    graph, params = nnx.split(nnx.eval_shape(_ConvMLP))
    rng = np.random.default_rng(9)
    params = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), nnx.as_pure(params)
    )

    def forward(params, x, state=None):
        model = nnx.merge(graph, params)
        if state is None:
            return model(x)
        with use_input_projection(model, state):
            return model(x)

    def loss(params, x, y, state=None):
        logits, _ = forward(params, x, state)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, forward, loss


def test_input_side_step_equals_plain_step():
    """``input_projected=``: P absorbs the step's inputs first, the dense layers project
    their own gradient, ``(P X^T) D``; the conv kernel and biases are projected by
    ``update``. Over several steps (P changing at each) the same parameters and P."""
    from rgo_jax import _matrices  # noqa: PLC0415

    params, forward, loss = _conv_mlp_problem()
    lr, alpha = 0.5, 0.3
    plain = optax.chain(scale_by_owm(project_biases=True), optax.sgd(lr))
    fast = optax.chain(
        scale_by_owm(project_biases=True, input_projected=r"^(fc1|head)/kernel$"),
        optax.sgd(lr),
    )
    p_plain, s_plain = params, plain.init(params)
    p_fast, s_fast = params, fast.init(params)
    marked = {
        _layout_path(path)
        for path, node in jax.tree_util.tree_flatten_with_path(
            s_fast[0].p, is_leaf=lambda x: isinstance(x, _matrices.InputProjected)
        )[0]
        if isinstance(node, _matrices.InputProjected)
    }
    assert marked == {"fc1/kernel", "head/kernel"}  # not the conv kernel, not the biases

    def step(carry, batch):  # both steps, side by side; one compiled scan for all steps
        (p_plain, s_plain), (p_fast, s_fast) = carry
        x, y = batch
        g = jax.grad(loss)(p_plain, x, y)
        inputs = forward(p_plain, x)[1]
        u_plain, s_plain = plain.update(g, s_plain, p_plain, owm_inputs=inputs, owm_alpha=alpha)
        s_fast = owm_update(s_fast, forward(p_fast, x)[1], alpha)
        g_layer = jax.grad(loss)(p_fast, x, y, s_fast)
        u_fast, s_fast = fast.update(g_layer, s_fast, p_fast)
        carry = (
            (optax.apply_updates(p_plain, u_plain), s_plain),
            (optax.apply_updates(p_fast, u_fast), s_fast),
        )
        return carry, (u_plain, u_fast, s_plain, s_fast, g, g_layer, inputs["fc1/kernel"])

    rng = np.random.default_rng(8)
    xs = jnp.asarray(rng.normal(size=(4, 3, 2, 2, 2)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 2, size=(4, 3)), jnp.int32)
    init = ((p_plain, s_plain), (p_fast, s_fast))
    (_, (_, s_fast)), out = jax.jit(lambda c, b: jax.lax.scan(step, c, b))(init, (xs, ys))
    u_plain, u_fast, st_plain, st_fast, g, g_layer, fc1_in = jax.tree.map(np.asarray, out)
    # every step's update and P (the arrays carry a leading step axis)
    for a, b in zip(jax.tree.leaves(u_fast), jax.tree.leaves(u_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(st_fast), jax.tree.leaves(st_plain), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # The conv kernel's gradient leaves its layer unprojected (update projects it).
    np.testing.assert_allclose(g_layer["conv"]["kernel"], g["conv"]["kernel"], rtol=1e-5, atol=1e-7)
    # Independent check of step 0 in float64: -lr P G with P = (I + r r^T / a)^-1.
    p64 = _closed_form(fc1_in[0].astype(np.float64).mean(0)[None], alpha, 1.0)
    want = -lr * p64 @ g["fc1"]["kernel"][0].astype(np.float64)
    np.testing.assert_allclose(u_fast["fc1"]["kernel"][0], want, rtol=1e-4, atol=1e-7)
    assert not np.allclose(want, -lr * g["fc1"]["kernel"][0], atol=1e-4)  # P mattered
    assert int(s_fast[0].count) == 4


def _layout_path(path) -> str:
    from rgo_jax import layouts  # noqa: PLC0415

    return layouts.path_str(path)


def test_input_side_errors_name_the_problem():
    params, _, _ = _conv_mlp_problem()
    with pytest.raises(
        ValueError,
        match=r"OWM input projection: parameter 'conv/kernel'.*"
        r"only dense kernels",
    ):
        scale_by_owm(input_projected=r"kernel$").init(params)
    with pytest.raises(ValueError, match="OWM input projection: the selection matches none"):
        scale_by_owm(input_projected=r"nothing_like_this").init(params)
    tx = scale_by_owm(input_projected=r"^fc1/kernel$")
    state = tx.init(params)
    # update(owm_inputs=) would absorb after the layers had projected with the older P.
    with pytest.raises(ValueError, match="Absorb them with owm_update before computing"):
        tx.update(params, state, owm_inputs={}, owm_alpha=1.0)


def test_one_matrix_absorption_does_not_copy_p():
    """OWM's step (one vector, one P per layer) updates a donated P in place: no P-sized
    temporary (the kernel vmapped over a stack of one matrix had one, and copied it into
    the output: 2.4x slower at d = 784)."""
    d = 96
    state = scale_by_owm().init({"w": jnp.zeros((d, 2))})
    x = jnp.ones((4, d), jnp.float32)
    absorb = jax.jit(lambda s, x: owm_update(s, {"w": x}, 1.0), donate_argnums=0)
    temp = absorb.lower(state, x).compile().memory_analysis().temp_size_in_bytes
    assert temp < d * d * 4 // 4, temp
