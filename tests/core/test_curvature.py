"""Curvature vectors: closed forms for a linear softmax model, conv = dense over patches."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgo_jax


def _linear_problem(seed=0, b=6, d=5, c=4):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(b, d)).astype(np.float32)
    labels = np.array([0, 1, 1, 2, 0, 2][:b], np.int32)
    params = {
        "w": rng.normal(size=(d, c)).astype(np.float32),
        "b": rng.normal(size=c).astype(np.float32),
    }
    return params, x, labels


def _logits(params, x):
    return x @ params["w"] + params["b"][None, :]


def _reference(params, x, labels, mask):
    """float64: v_w = mean_out( sum_b s_b x_b e_{y_b}^T ), v_b = sum_b s_b e_{y_b}."""
    z = x.astype(np.float64) @ params["w"] + params["b"]
    z = np.where(mask, z, -np.inf)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pt = p[np.arange(len(labels)), labels]
    s = np.sqrt(pt * (1 - pt))
    c = params["w"].shape[1]
    onehot = np.eye(c)[labels]
    vw = (s[:, None] * x).T @ onehot  # [d, c]
    vb = s[:, None] * onehot
    return s, vw.mean(axis=1), vb


def test_per_batch_vector_matches_closed_form():
    params, x, labels = _linear_problem()
    v = rgo_jax.curvature_vectors(_logits, params, x, labels)
    present = np.isin(np.arange(4), labels)  # class 3 absent -> excluded from the softmax
    _, vw, vb = _reference(params, x, labels, present)
    assert v["w"].shape == (1, 5) and v["b"].shape == (1, 4)
    np.testing.assert_allclose(v["w"][0], vw, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v["b"][0], vb.sum(0), rtol=1e-5, atol=1e-6)


def test_per_sample_vectors_sum_to_batch_vector_and_use_batch_mask():
    params, x, labels = _linear_problem(1)
    batch = rgo_jax.curvature_vectors(_logits, params, x, labels)
    per = rgo_jax.curvature_vectors(_logits, params, x, labels, per_sample=True)
    assert per["w"].shape == (6, 5)
    np.testing.assert_allclose(per["w"].sum(0), batch["w"][0], rtol=1e-5, atol=1e-6)
    present = np.isin(np.arange(4), labels)
    s, _, vb = _reference(params, x, labels, present)
    np.testing.assert_allclose(per["b"], vb, rtol=1e-5, atol=1e-6)
    assert np.all(s > 0) and bool(jnp.all(jnp.abs(per["b"]).sum(1) > 0))


def test_class_mask_is_used_and_single_class_gives_zero():
    params, x, labels = _linear_problem(2)
    mask = np.array([True, True, True, True])
    v = rgo_jax.curvature_vectors(_logits, params, x, labels, class_mask=jnp.asarray(mask))
    _, vw, _ = _reference(params, x, labels, mask)
    np.testing.assert_allclose(v["w"][0], vw, rtol=1e-5, atol=1e-6)
    # The pitfall: a batch of one with "classes present" gives p = 1 and a zero vector.
    v1 = rgo_jax.curvature_vectors(_logits, params, x[:1], labels[:1])
    np.testing.assert_allclose(v1["w"], 0.0, atol=1e-7)
    with pytest.raises(ValueError, match="class_mask"):
        rgo_jax.curvature_vectors(_logits, params, x, labels, class_mask=jnp.ones(3, bool))
    with pytest.raises(ValueError, match="labels"):
        rgo_jax.curvature_vectors(_logits, params, x, labels.astype(np.float32))
    with pytest.raises(ValueError, match="6 examples but labels has 2"):
        rgo_jax.curvature_vectors(_logits, params, x, labels[:2])


def test_unprojected_leaves_get_none():
    params, x, labels = _linear_problem()
    v = rgo_jax.curvature_vectors(_logits, params, x, labels, project_biases=False)
    assert v["b"] is None and v["w"].shape == (1, 5)


def _im2col(x, kh, kw):
    """Independent numpy im2col for VALID stride-1 convs, HWIO flatten order [kh, kw, cin]."""
    b, h, w, c = x.shape
    rows = []
    for n in range(b):
        for i in range(h - kh + 1):
            for j in range(w - kw + 1):
                rows.append(x[n, i : i + kh, j : j + kw, :].reshape(-1))
    return np.asarray(rows).reshape(b, (h - kh + 1) * (w - kw + 1), kh * kw * c)


@pytest.mark.slow
def test_conv_layout_equals_dense_over_patches():
    rng = np.random.default_rng(3)
    kh, kw, cin, cout, b = 3, 2, 2, 4, 5
    x = rng.normal(size=(b, 6, 5, cin)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 1], np.int32)
    kernel = rng.normal(size=(kh, kw, cin, cout)).astype(np.float32) * 0.3
    bias = rng.normal(size=cout).astype(np.float32)
    patches = jnp.asarray(_im2col(x, kh, kw))

    def conv_logits(p, xb):
        y = jax.lax.conv_general_dilated(
            xb, p["k"], (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        return (y + p["b"][None, None, None, :]).mean(axis=(1, 2))

    def dense_logits(p, pb):
        return (pb @ p["k"] + p["b"][None, None, :]).mean(axis=1)

    conv_params = {"k": jnp.asarray(kernel), "b": jnp.asarray(bias)}
    dense_params = {"k": jnp.asarray(kernel.reshape(-1, cout)), "b": jnp.asarray(bias)}
    np.testing.assert_allclose(
        conv_logits(conv_params, x), dense_logits(dense_params, patches), rtol=1e-4, atol=1e-5
    )
    vc = rgo_jax.curvature_vectors(
        conv_logits, conv_params, jnp.asarray(x), labels, per_sample=True
    )
    vd = rgo_jax.curvature_vectors(dense_logits, dense_params, patches, labels, per_sample=True)
    np.testing.assert_allclose(vc["k"], vd["k"], rtol=1e-4, atol=1e-6)

    tx = rgo_jax.scale_by_rgo()
    sc = rgo_jax.update_projection(tx.init(conv_params), vc, 0.1)
    sd = rgo_jax.update_projection(tx.init(dense_params), vd, 0.1)
    np.testing.assert_allclose(sc.p["k"], sd.p["k"], rtol=1e-4, atol=1e-6)
    gc = jax.grad(lambda p: conv_logits(p, x).sum())(conv_params)
    gd = jax.grad(lambda p: dense_logits(p, patches).sum())(dense_params)
    uc, _ = tx.update(gc, sc)
    ud, _ = tx.update(gd, sd)
    np.testing.assert_allclose(uc["k"].reshape(-1, cout), ud["k"], rtol=1e-4, atol=1e-6)
