"""GPM baseline: energy threshold, orthonormal bases, orthogonal projected gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rgo_jax.baselines import GPMState, gpm_update_bases, scale_by_gpm


def _rep(rng, rows: int, directions: np.ndarray, svals) -> np.ndarray:
    """``U diag(s) V^T`` with orthonormal ``U [rows, k]`` and ``V = directions [d, k]``."""
    u = np.linalg.qr(rng.normal(size=(rows, len(svals))))[0]
    return (u * np.asarray(svals, np.float64)) @ directions.T


def _basis(state: GPMState, *path: str) -> np.ndarray:
    m, r = state.bases, state.rank
    for k in path:
        m, r = m[k], r[k]
    return np.asarray(m, np.float64)[:, : int(r)]


def _projector_distance(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a @ a.T - b @ b.T))


def test_rank3_data_threshold_099_keeps_exactly_3():
    rng = np.random.default_rng(0)
    d = 10
    v = np.linalg.qr(rng.normal(size=(d, 3)))[0]
    rep = _rep(rng, 50, v, [3.0, 2.0, 1.0])  # top-2 energy 13/14 = 0.93 < 0.99
    state = scale_by_gpm().init({"fc": {"kernel": jnp.zeros((d, 4))}})
    assert int(state.rank["fc"]["kernel"]) == 0
    state = gpm_update_bases(state, {"fc/kernel": rep.astype(np.float32)}, 0.99)
    m = _basis(state, "fc", "kernel")
    assert m.shape == (d, 3)
    np.testing.assert_allclose(m.T @ m, np.eye(3), atol=1e-6)  # orthonormal columns
    assert _projector_distance(m, v) < 1e-5  # the data's row space
    padded = np.asarray(state.bases["fc"]["kernel"])
    np.testing.assert_array_equal(padded[:, 3:], 0.0)  # zero padding past the rank
    assert int(state.count) == 1


@pytest.mark.parametrize("threshold", [0.5, 0.75, 0.9, 0.95, 0.99, 0.999])
def test_energy_threshold_smallest_k(threshold):
    rng = np.random.default_rng(1)
    d = 8
    s = np.array([4.0, 2.0, 1.0, 0.5, 0.1])
    v = np.linalg.qr(rng.normal(size=(d, 5)))[0]
    rep = _rep(rng, 40, v, s)
    energy = s**2 / np.sum(s**2)
    want = next(k for k in range(1, 6) if energy[:k].sum() >= threshold)  # paper eq. 5
    state = scale_by_gpm().init({"w": jnp.zeros((d, 2))})
    state = gpm_update_bases(state, {"w": rep}, threshold)
    m = _basis(state, "w")
    assert m.shape[1] == want
    assert _projector_distance(m, v[:, :want]) < 1e-4  # the top singular directions


def test_second_task_adds_only_new_directions():
    rng = np.random.default_rng(2)
    d = 6
    e = np.eye(d)
    state = scale_by_gpm().init({"w": jnp.zeros((d, 3))})
    state = gpm_update_bases(state, {"w": _rep(rng, 30, e[:, :3], [3.0, 2.0, 1.0])}, 0.99)
    old = _basis(state, "w")
    # Task 2 lives in span{e0, e3}: only e3 is new.
    state = gpm_update_bases(state, {"w": _rep(rng, 30, e[:, [0, 3]], [2.0, 1.0])}, 0.99)
    new = _basis(state, "w")
    assert new.shape == (d, 4)
    np.testing.assert_array_equal(new[:, :3], old)  # stored directions untouched
    np.testing.assert_allclose(new.T @ new, np.eye(4), atol=1e-6)
    assert _projector_distance(new, e[:, :4]) < 1e-5
    # A third task inside the stored span adds nothing.
    state = gpm_update_bases(state, {"w": _rep(rng, 30, e[:, [1, 3]], [1.0, 1.0])}, 0.999)
    assert int(state.rank["w"]) == 4 and int(state.count) == 3


@pytest.mark.parametrize("threshold,added", [(0.85, 0), (0.97, 1), (0.99, 2)])
def test_later_task_criterion_counts_protected_energy(threshold, added):
    """Energy 0.9 already in the basis; residual directions carry 0.08 and 0.02 (eq. 9)."""
    rng = np.random.default_rng(3)
    d = 5
    e = np.eye(d)
    state = scale_by_gpm().init({"w": jnp.zeros((d, 2))})
    state = gpm_update_bases(state, {"w": _rep(rng, 20, e[:, :1], [1.0])}, 0.9)
    rep = _rep(rng, 20, e[:, :3], np.sqrt([0.9, 0.08, 0.02]))
    state = gpm_update_bases(state, {"w": rep}, threshold)
    m = _basis(state, "w")
    assert m.shape[1] == 1 + added
    assert _projector_distance(m, e[:, : 1 + added]) < 1e-5


def test_projected_gradient_is_orthogonal_to_the_basis():
    rng = np.random.default_rng(4)
    params = {"fc": {"kernel": jnp.zeros((6, 3))}, "conv": {"kernel": jnp.zeros((2, 2, 3, 4))}}
    tx = scale_by_gpm()
    state = tx.init(params)
    reps = {
        "fc/kernel": _rep(rng, 20, np.linalg.qr(rng.normal(size=(6, 2)))[0], [2.0, 1.0]),
        "conv/kernel": _rep(rng, 40, np.linalg.qr(rng.normal(size=(12, 4)))[0], [4, 3, 2, 1]),
    }
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
    out0, _ = tx.update(g, state)  # empty basis: identity (the first task)
    jax.tree.map(np.testing.assert_array_equal, out0, g)
    state = gpm_update_bases(state, reps, 0.999)
    out, _ = jax.jit(tx.update)(g, state)
    for name, shape in (("fc", (6, 3)), ("conv", (12, 4))):
        m = _basis(state, name, "kernel")
        gm = np.asarray(g[name]["kernel"], np.float64).reshape(shape)  # HWIO flatten
        pg = np.asarray(out[name]["kernel"], np.float64).reshape(shape)
        assert np.abs(m.T @ pg).max() < 1e-5 * np.abs(gm).max()
        np.testing.assert_allclose(pg, gm - m @ (m.T @ gm), atol=1e-5)


def test_biases_are_frozen_after_the_first_task_when_projected():
    params = {"fc": {"kernel": jnp.zeros((3, 2)), "bias": jnp.zeros(2)}}
    tx = scale_by_gpm(project_biases=True)
    state = tx.init(params)
    assert state.bases["fc"]["bias"].shape == (1, 1)
    state = gpm_update_bases(state, {"fc/kernel": np.eye(3)[:1]}, 0.97)
    assert int(state.rank["fc"]["bias"]) == 1
    g = {"fc": {"kernel": jnp.ones((3, 2)), "bias": jnp.array([1.0, -2.0])}}
    out, _ = tx.update(g, state)
    np.testing.assert_allclose(out["fc"]["bias"], [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(out["fc"]["kernel"], [[0, 0], [1, 1], [1, 1]], atol=1e-7)
    # Unprojected by default:
    plain = scale_by_gpm().init(params)
    assert plain.bases["fc"]["bias"] == optax.MaskedNode()


def test_full_rank_basis_stops_at_d():
    rng = np.random.default_rng(5)
    state = scale_by_gpm().init({"w": jnp.zeros((4, 2))})
    state = gpm_update_bases(state, {"w": rng.normal(size=(30, 4))}, 1.0)
    assert int(state.rank["w"]) == 4
    state = gpm_update_bases(state, {"w": rng.normal(size=(30, 4))}, 1.0)
    assert int(state.rank["w"]) == 4
    out, _ = scale_by_gpm().update({"w": jnp.ones((4, 2))}, state)
    np.testing.assert_allclose(out["w"], 0.0, atol=1e-5)


def test_per_leaf_thresholds_stacked_layers_and_errors():
    rng = np.random.default_rng(6)
    from rgo_jax import layouts as L

    tx = scale_by_gpm(layout=lambda path, leaf: L.stacked(L.DENSE) if leaf.ndim == 3 else None)
    state = tx.init({"blocks": jnp.zeros((2, 5, 3)), "head": jnp.zeros((5, 2))})
    assert state.bases["head"] == state.rank["head"] == optax.MaskedNode()
    v = np.linalg.qr(rng.normal(size=(5, 2)))[0]
    reps = np.stack([_rep(rng, 10, v, [1.0, 0.1]), _rep(rng, 10, v[:, :1], [1.0])])
    new = gpm_update_bases(state, {"blocks": reps}, {"blocks": 0.999})
    np.testing.assert_array_equal(new.rank["blocks"], [2, 1])
    with pytest.raises(ValueError, match="no entry for projected parameter 'blocks'"):
        gpm_update_bases(state, {"blocks": reps}, {"head": 0.9})
    with pytest.raises(ValueError, match=r"threshold for 'blocks' must be in \(0, 1\]"):
        gpm_update_bases(state, {"blocks": reps}, 1.5)
    with pytest.raises(ValueError, match="no representation for projected parameter 'blocks'"):
        gpm_update_bases(state, {"head": reps}, 0.9)
    with pytest.raises(ValueError, match="'blocks' has shape"):
        gpm_update_bases(state, {"blocks": reps[0]}, 0.9)


def test_chain_and_nnx_optimizer_roundtrip():
    model = nnx.Linear(3, 2, use_bias=False, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.chain(scale_by_gpm(), optax.sgd(1.0)), wrt=nnx.Param)
    new = gpm_update_bases(nnx.as_pure(opt.opt_state), {"kernel": np.eye(3)[:1]}, 0.9)
    nnx.update(opt.opt_state, nnx.state(new))
    w0 = np.asarray(model.kernel[...])
    x = jnp.ones((4, 3))
    grads = nnx.grad(lambda m: jnp.sum(m(x)))(model)
    opt.update(model, grads)
    # Row 0 (input e_0) is protected; the others take the plain SGD step of -4.
    np.testing.assert_allclose(model.kernel[...] - w0, [[0, 0], [-4, -4], [-4, -4]], atol=1e-6)
