"""EWC baseline: the quadratic penalty, the diagonal Fisher, multi-task and online accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from rgo_jax.baselines import (
    diagonal_fisher,
    ewc_accumulate,
    ewc_loss,
    ewc_penalty,
)


def _rand_tree(rng, scale=1.0, positive=False):
    def draw(shape):
        x = rng.normal(size=shape) * scale
        return jnp.asarray(np.abs(x) if positive else x, jnp.float32)

    return {"fc": {"kernel": draw((3, 2)), "bias": draw((2,))}, "out": draw((4,))}


def _np_penalty(params, anchors, fisher, lam) -> float:
    tot = 0.0
    for p, a, f in zip(*(jax.tree.leaves(t) for t in (params, anchors, fisher)), strict=True):
        d = np.asarray(p, np.float64) - np.asarray(a, np.float64)
        tot += float(np.sum(np.asarray(f, np.float64) * d * d))
    return 0.5 * lam * tot


def test_penalty_zero_at_anchor_and_exactly_quadratic():
    rng = np.random.default_rng(0)
    anchor, fisher, d = _rand_tree(rng), _rand_tree(rng, positive=True), _rand_tree(rng)
    assert float(ewc_penalty(anchor, anchor, fisher, 3.0)) == 0.0
    at = lambda t: jax.tree.map(lambda a, x: a + t * x, anchor, d)
    base = float(ewc_penalty(at(1.0), anchor, fisher, 3.0))
    np.testing.assert_allclose(base, _np_penalty(at(1.0), anchor, fisher, 3.0), rtol=1e-5)
    for t in (-2.0, 0.5, 3.0):
        np.testing.assert_allclose(
            float(ewc_penalty(at(t), anchor, fisher, 3.0)), t * t * base, rtol=1e-5
        )
    # Its gradient is lam * F * (theta - theta*).
    g = jax.grad(ewc_penalty)(at(1.0), anchor, fisher, 3.0)
    jax.tree.map(
        lambda gi, f, di: np.testing.assert_allclose(gi, 3.0 * f * di, rtol=1e-5), g, fisher, d
    )


def _linear(p, x):
    return x @ p["w"] + p["b"][None, :]


def _softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _linear_problem(rng, n=5):
    params = {
        "w": jnp.asarray(rng.normal(size=(2, 3)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=3), jnp.float32),
    }
    x = rng.normal(size=(n, 2)).astype(np.float32)
    y = rng.integers(0, 3, size=n)
    return params, x, y


def test_true_fisher_of_linear_softmax_by_hand():
    rng = np.random.default_rng(1)
    params, x, y = _linear_problem(rng)
    p = _softmax(
        x.astype(np.float64) @ np.asarray(params["w"], np.float64)
        + np.asarray(params["b"], np.float64)
    )
    # d log p_c / d W[i, k] = x_i (1[c=k] - p_k), so E_c[.^2] = x_i^2 p_k (1 - p_k).
    want_w = np.mean(x[:, :, None].astype(np.float64) ** 2 * (p * (1 - p))[:, None, :], axis=0)
    want_b = np.mean(p * (1 - p), axis=0)
    f = diagonal_fisher(
        _linear, params, x, jnp.asarray(y), class_mask=np.ones(3, bool), chunk_size=2
    )
    np.testing.assert_allclose(f["w"], want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["b"], want_b, rtol=1e-5, atol=1e-7)


class _Unhashable:
    """A logits function that cannot be a static jit argument."""

    __hash__ = None

    def __call__(self, p, x):
        return _linear(p, x)


@pytest.mark.parametrize("kind", ["exact", "sampled"])
def test_fisher_same_by_scan_or_calls_and_for_unhashable_logits_fn(kind):
    # A compiled call per chunk (the fast way for conv nets on CPU) changes only the speed;
    # an unhashable logits function (not a static jit argument) gets a jitted closure.
    rng = np.random.default_rng(6)
    params, x, y = _linear_problem(rng, n=7)  # 3 chunks of 3, the last padded
    key = jax.random.key(1) if kind == "sampled" else None

    def fisher(fn, loop):
        return diagonal_fisher(fn, params, x, jnp.asarray(y), rng=key, chunk_size=3, loop=loop)

    scanned = fisher(_linear, "scan")
    assert float(jnp.sum(scanned["b"])) > 0
    others = (
        fisher(_linear, "calls"),
        fisher(_Unhashable(), "scan"),
        fisher(_Unhashable(), "calls"),
    )
    for other in others:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), scanned, other
        )
    with pytest.raises(ValueError, match="loop must be 'scan' or 'calls'"):
        fisher(_linear, "python")


def test_empirical_fisher_uses_the_labels():
    rng = np.random.default_rng(2)
    params, x, y = _linear_problem(rng, n=6)
    p = _softmax(
        x.astype(np.float64) @ np.asarray(params["w"], np.float64)
        + np.asarray(params["b"], np.float64)
    )
    r = np.eye(3)[y] - p  # d log p_y / d z
    want_w = np.mean(x[:, :, None].astype(np.float64) ** 2 * r[:, None, :] ** 2, axis=0)
    f = diagonal_fisher(
        _linear, params, x, jnp.asarray(y), class_mask=np.ones(3, bool), empirical=True
    )
    np.testing.assert_allclose(f["w"], want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(f["b"], np.mean(r**2, axis=0), rtol=1e-5, atol=1e-7)


def test_class_mask_restricts_the_distribution():
    rng = np.random.default_rng(3)
    params, x, _ = _linear_problem(rng)
    mask = np.array([True, False, True])
    z = x.astype(np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(
        params["b"], np.float64
    )
    p = np.zeros_like(z)
    p[:, mask] = _softmax(z[:, mask])
    want_b = np.mean(p * (1 - p), axis=0)
    y = jnp.array([0, 2, 0, 2, 0])
    f = diagonal_fisher(_linear, params, x, y, class_mask=jnp.asarray(mask))
    np.testing.assert_allclose(f["b"], want_b, rtol=1e-5, atol=1e-7)
    assert float(f["b"][1]) == 0.0 and np.all(np.isfinite(f["w"]))
    # Default: the classes present in the labels, here the same two.
    f2 = diagonal_fisher(_linear, params, x, y)
    np.testing.assert_allclose(f2["b"], want_b, rtol=1e-5, atol=1e-7)
    # A traced mask (inside jit) takes the all-classes path with zero weights: same value.
    f3 = jax.jit(lambda m: diagonal_fisher(_linear, params, x, y, class_mask=m))(jnp.asarray(mask))
    np.testing.assert_allclose(f3["b"], want_b, rtol=1e-5, atol=1e-7)


def test_sampled_true_fisher_converges():
    rng = np.random.default_rng(4)
    params, _, _ = _linear_problem(rng)
    n = 2000
    x = np.tile(np.array([[1.0, -0.5]], np.float32), (n, 1))
    f = diagonal_fisher(
        _linear,
        params,
        x,
        jnp.zeros(n, jnp.int32),
        class_mask=np.ones(3, bool),
        rng=jax.random.key(0),
        chunk_size=100,
    )
    p = _softmax(
        np.array([1.0, -0.5]) @ np.asarray(params["w"], np.float64)
        + np.asarray(params["b"], np.float64)
    )
    want_b = p * (1 - p)
    # Per-sample value (1[c=k] - p_k)^2 has variance below 1/4: 5 sigma.
    np.testing.assert_allclose(f["b"], want_b, atol=5 * 0.5 / np.sqrt(n))


def test_fisher_errors():
    params, x, y = _linear_problem(np.random.default_rng(5))
    with pytest.raises(ValueError, match="labels must be int"):
        diagonal_fisher(_linear, params, x, jnp.zeros(4, jnp.int32))
    with pytest.raises(ValueError, match="class_mask must be bool"):
        diagonal_fisher(_linear, params, x, jnp.asarray(y), class_mask=np.ones(4, bool))
    with pytest.raises(ValueError, match="either empirical=True or rng="):
        diagonal_fisher(_linear, params, x, jnp.asarray(y), empirical=True, rng=jax.random.key(0))


def test_multi_task_accumulation_equals_sum_of_task_penalties():
    rng = np.random.default_rng(6)
    tasks = [(_rand_tree(rng), _rand_tree(rng, positive=True)) for _ in range(3)]
    # Some Fisher entries exactly zero in one task.
    tasks[1] = (tasks[1][0], jax.tree.map(lambda f: f.at[0].set(0.0), tasks[1][1]))
    state = None
    for theta, fisher in tasks:
        state = ewc_accumulate(state, theta, fisher)
    assert int(state.num_tasks) == 3
    lam = 0.7
    literal = lambda p: sum(ewc_penalty(p, a, f, lam) for a, f in tasks)
    for _ in range(3):
        p = _rand_tree(rng, scale=2.0)
        np.testing.assert_allclose(float(state.penalty(p, lam)), float(literal(p)), rtol=1e-5)
        g1, g2 = jax.grad(state.penalty)(p, lam), jax.grad(literal)(p)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g1, g2)
    # The Fisher is the plain sum.
    want = jax.tree.map(lambda *f: sum(f), *(f for _, f in tasks))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), state.fisher, want)


def test_online_ewc_decay_arithmetic():
    theta1, theta2 = {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([-1.0, 5.0])}
    s = ewc_accumulate(None, theta1, {"w": jnp.array([4.0, 1.0])}, online=True, gamma=0.5)
    s = ewc_accumulate(s, theta2, {"w": jnp.array([1.0, 2.0])}, online=True, gamma=0.5)
    np.testing.assert_allclose(s.fisher["w"], [0.5 * 4 + 1, 0.5 * 1 + 2])
    np.testing.assert_array_equal(s.anchors["w"], theta2["w"])
    assert float(s.offset) == 0.0
    # Penalty of online EWC: zero at the latest anchor.
    assert float(s.penalty(theta2, 10.0)) == 0.0
    np.testing.assert_allclose(float(s.penalty(theta1, 10.0)), 5.0 * (3.0 * 4 + 2.5 * 9))
    with pytest.raises(ValueError, match="gamma must be in"):
        ewc_accumulate(s, theta2, {"w": jnp.ones(2)}, online=True, gamma=1.5)
    with pytest.raises(ValueError, match="Fisher of 'w' has negative entries"):
        ewc_accumulate(s, theta2, {"w": -jnp.ones(2)})


@pytest.mark.slow
def test_loss_wrapper_and_nnx_state_params():
    rng = np.random.default_rng(7)
    params, x, y = _linear_problem(rng)
    fisher = diagonal_fisher(_linear, params, x, jnp.asarray(y))
    state = ewc_accumulate(None, params, fisher)

    def ce(p, x, y):
        z = _linear(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(z), y[:, None], 1)), z

    loss = ewc_loss(ce, lam=5.0, has_aux=True)
    moved = jax.tree.map(lambda t: t + 0.3, params)
    (val, aux), _ = jax.value_and_grad(loss, has_aux=True)(moved, state, x, jnp.asarray(y))
    plain, _ = ce(moved, x, jnp.asarray(y))
    np.testing.assert_allclose(
        float(val), float(plain) + _np_penalty(moved, params, fisher, 5.0), rtol=1e-5
    )
    assert aux.shape == (5, 3)
    val0, _ = loss(moved, None, x, jnp.asarray(y))  # first task: no penalty
    np.testing.assert_allclose(float(val0), float(plain))
    # NNX: the penalty accepts an nnx.State of Params against pure anchors.
    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    pure = nnx.as_pure(nnx.state(model, nnx.Param))
    s = ewc_accumulate(None, pure, jax.tree.map(jnp.ones_like, pure))
    assert float(s.penalty(nnx.state(model, nnx.Param), 1.0)) == 0.0
    with pytest.raises(ValueError, match=r"anchors has no entry for parameter\(s\) \['extra'\]"):
        ewc_penalty({**pure, "extra": jnp.zeros(1)}, pure, pure, 1.0)
