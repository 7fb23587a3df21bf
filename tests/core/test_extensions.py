"""RGO's opt-in extensions beyond the paper, each against a float64 closed form.

* ``curvature_vectors(hessian="full")``: the paper's Eq. 13 with the whole softmax
  cross-entropy Hessian ``diag(p) - p p^T`` through its square-root factor;
* ``curvature_vectors(hessian="sampled")``: a sampled Fisher with the same expectation;
* ``update_projection(relative_alpha=True)``: alpha relative to each leaf's curvature;
* ``scale_by_rgo(trace_normalisation="global")``: one trace scale for the whole network.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgo_jax
from rgo_jax import _curvature, _transform


def _softmax(z, mask):
    z = np.where(mask, z, -np.inf)
    p = np.exp(z - z.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def test_hessian_factor_squares_to_the_softmax_hessian():
    rng = np.random.default_rng(0)
    mask = np.array([True, True, False, True, True])
    p = _softmax(rng.normal(size=(3, 5)), mask)  # float64, one masked class
    with jax.enable_x64(True):
        f = np.asarray(_curvature.hessian_factor(jnp.asarray(p, jnp.float64)))
    assert f.dtype == np.float64
    want = np.stack([np.diag(q) - np.outer(q, q) for q in p])
    np.testing.assert_allclose(f @ np.swapaxes(f, -1, -2), want, atol=1e-15)
    assert np.all(f[:, 2, :] == 0) and np.all(f[:, :, 2] == 0)  # masked class: no curvature


def _two_layer(seed=0, b=4, d=3, h=5, c=4):
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(d, h)).astype(np.float32),
        "w2": rng.normal(size=(h, c)).astype(np.float32),
        "b2": rng.normal(size=c).astype(np.float32),
    }
    x = rng.normal(size=(b, d)).astype(np.float32)
    y = np.array([0, 1, 3, 1][:b], np.int32)
    return params, x, y


def _logits(p, x):
    return jnp.tanh(x @ p["w1"]) @ p["w2"] + p["b2"][None, :]


def _full_reference(params, x, y, mask):
    """float64 per-sample vectors of every class: [B * C, ...] (sample-major, class-minor)."""
    w1, w2, b2 = (np.asarray(params[k], np.float64) for k in ("w1", "w2", "b2"))
    x = x.astype(np.float64)
    hid = np.tanh(x @ w1)
    p = _softmax(hid @ w2 + b2, mask)
    out = {"w1": [], "w2": [], "b2": []}
    for i in range(len(x)):
        for c in range(len(b2)):
            cot = np.sqrt(p[i, c]) * (np.eye(len(b2))[c] - p[i])  # column c of F
            delta = (w2 @ cot) * (1 - hid[i] ** 2)
            out["b2"].append(cot)
            out["w2"].append(np.outer(hid[i], cot).mean(1))  # mean over the outputs
            out["w1"].append(np.outer(x[i], delta).mean(1))
    return {k: np.array(v) for k, v in out.items()}, p


def test_full_hessian_vectors_match_the_float64_closed_form():
    params, x, y = _two_layer()
    mask = np.array([True, True, False, True])
    v = rgo_jax.curvature_vectors(
        _logits, params, x, y, class_mask=jnp.asarray(mask), per_sample=True, hessian="full"
    )
    ref, p = _full_reference(params, x, y, mask)
    for k in ref:
        assert v[k].shape == ref[k].shape
        np.testing.assert_allclose(v[k], ref[k], rtol=2e-5, atol=2e-6, err_msg=k)
    # the class vectors of each sample add up to its Gauss-Newton term on the logits
    b = np.asarray(v["b2"], np.float64).reshape(len(x), 4, 4)
    for i in range(len(x)):
        np.testing.assert_allclose(b[i].T @ b[i], np.diag(p[i]) - np.outer(p[i], p[i]), atol=1e-6)
    # the columns of F sum to zero over the logits: the last kernel's mean-reduced vectors
    # vanish (the reference reduction loses the output layer's curvature with this factor)
    np.testing.assert_allclose(v["w2"], 0.0, atol=1e-6)


def test_full_hessian_per_batch_is_the_sum_of_its_samples():
    params, x, y = _two_layer(1)
    per = rgo_jax.curvature_vectors(_logits, params, x, y, per_sample=True, hessian="full")
    batch = rgo_jax.curvature_vectors(_logits, params, x, y, hessian="full")
    assert batch["w1"].shape == (4, 3)  # one vector per class
    for k in per:
        summed = np.asarray(per[k]).reshape(len(x), 4, -1).sum(0)
        np.testing.assert_allclose(batch[k], summed, rtol=1e-5, atol=1e-6, err_msg=k)


def test_sampled_fisher_vectors_are_one_hot_minus_p_with_the_hessian_as_mean():
    params, x, y = _two_layer(2, b=1)
    n = 4000
    xs, ys = np.repeat(x, n, 0), np.repeat(y, n, 0)
    mask = np.array([True, True, False, True])
    v = rgo_jax.curvature_vectors(
        _logits,
        params,
        xs,
        ys,
        class_mask=jnp.asarray(mask),
        per_sample=True,
        hessian="sampled",
        rng=jax.random.key(0),
    )
    _, p = _full_reference(params, x, y, mask)
    b = np.asarray(v["b2"], np.float64)
    drawn = b + p[0]
    np.testing.assert_allclose(np.sort(drawn, 1)[:, -1], 1.0, atol=1e-5)  # a one-hot
    assert np.all(np.abs(drawn[:, 2]) < 1e-6)  # the masked class is never drawn
    hess = np.diag(p[0]) - np.outer(p[0], p[0])
    np.testing.assert_allclose(b.T @ b / n, hess, atol=0.02)  # Monte Carlo, 4000 draws


def test_hessian_argument_is_checked_and_the_default_is_unchanged():
    params, x, y = _two_layer()
    with pytest.raises(ValueError, match="hessian must be one of"):
        rgo_jax.curvature_vectors(_logits, params, x, y, hessian="diag")
    with pytest.raises(ValueError, match="needs an rng"):
        rgo_jax.curvature_vectors(_logits, params, x, y, hessian="sampled")
    a = rgo_jax.curvature_vectors(_logits, params, x, y)
    b = rgo_jax.curvature_vectors(_logits, params, x, y, hessian="true-class")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def _state(params):
    return rgo_jax.scale_by_rgo().init(params)


def test_relative_alpha_equals_its_closed_form_per_leaf():
    rng = np.random.default_rng(3)
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(3)}
    vw = rng.normal(size=(6, 4)) * 0.05  # leaves whose vectors differ in norm by 100x
    vb = rng.normal(size=(6, 3)) * 5.0
    vecs = {"w": jnp.asarray(vw, jnp.float32), "b": jnp.asarray(vb, jnp.float32)}
    alpha = 0.3
    rel = rgo_jax.update_projection(_state(params), vecs, alpha, relative_alpha=True)
    for k, v in (("w", vw), ("b", vb)):
        d = v.shape[1]
        a = alpha * np.sum(v**2) / d  # alpha * tr(sum v v^T) / d
        want = a * np.linalg.inv(a * np.eye(d) + v.T @ v)
        np.testing.assert_allclose(rel.p[k], want, rtol=2e-5, atol=1e-6, err_msg=k)
    # both leaves now see the same relative regularisation: tr(P)/d is of the same size
    tw, tb = (float(jnp.trace(rel.p[k])) / rel.p[k].shape[0] for k in ("w", "b"))
    assert 0.2 < tw / tb < 5


def test_relative_alpha_skips_non_finite_vectors_and_keeps_alpha_for_zero_ones():
    params = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}
    vw = np.array([[1.0, 0.0], [np.nan, 1.0], [0.0, 2.0]], np.float32)
    vecs = {"w": jnp.asarray(vw), "b": jnp.zeros((3, 2))}
    s = rgo_jax.update_projection(_state(params), vecs, 0.5, relative_alpha=True)
    good = vw[[0, 2]].astype(np.float64)
    a = 0.5 * np.sum(good**2) / 2
    np.testing.assert_allclose(s.p["w"], a * np.linalg.inv(a * np.eye(2) + good.T @ good), 1e-5)
    np.testing.assert_array_equal(s.p["b"], np.eye(2))  # zero vectors: P unchanged
    assert int(s.skipped) == 1


def test_global_trace_normalisation_uses_one_scale_for_all_leaves():
    params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros(3)}
    g = {"w": jnp.arange(8.0).reshape(4, 2) - 3, "b": jnp.array([1.0, -2.0, 0.5])}
    rng = np.random.default_rng(4)
    vecs = {
        "w": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(3, 3)) * 3, jnp.float32),
    }
    tx = rgo_jax.scale_by_rgo(trace_normalisation="global")
    state = rgo_jax.update_projection(tx.init(params), vecs, 0.1)
    out, _ = tx.update(g, state)
    pw, pb = (np.asarray(state.p[k], np.float64) for k in ("w", "b"))
    n_w, n_b = 8, 3  # parameters of each leaf
    t_bar = (n_w * np.trace(pw) / 4 + n_b * np.trace(pb) / 3) / (n_w + n_b)
    np.testing.assert_allclose(out["w"], pw @ np.asarray(g["w"]) / t_bar, rtol=1e-5)
    np.testing.assert_allclose(out["b"], pb @ np.asarray(g["b"]) / t_bar, rtol=1e-5)
    # the default normalises each leaf by its own trace (the same P)
    out0, _ = rgo_jax.scale_by_rgo().update(g, state)
    np.testing.assert_allclose(out0["b"], pb @ np.asarray(g["b"]) * 3 / np.trace(pb), rtol=1e-5)


def test_global_normalisation_starts_as_the_identity_and_is_checked():
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    tx = optax.chain(rgo_jax.scale_by_rgo(trace_normalisation="global"), optax.sgd(1.0))
    g = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    out, _ = tx.update(g, tx.init(params))
    np.testing.assert_allclose(out["w"], -np.ones((3, 2)), rtol=1e-6)
    with pytest.raises(ValueError, match="trace_normalisation must be one of"):
        rgo_jax.scale_by_rgo(trace_normalisation="layer")
    assert _transform.TRACE_NORMALISATIONS == ("per-leaf", "global")
