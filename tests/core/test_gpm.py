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


# --- the blocked projection with the complement basis ([M | N], project_out_basis) ---


def _old_project_out_basis(basis, g, rank):
    """The projection by a zero-padded basis before complement columns were stored (the
    reference that ranks up to d/2 must reproduce bit for bit)."""
    d = basis.shape[-1]
    size = -(-d // max(1, min(4, d // 64)))
    cols = jnp.arange(size)

    def body(i, acc):
        start = i * size
        mb = jax.lax.dynamic_slice_in_dim(basis, start, size, axis=-1)
        keep = cols + jnp.minimum(start, d - size) >= start
        mb = jnp.where(keep, mb, jnp.zeros_like(mb))
        return acc - jnp.matmul(mb, jnp.matmul(jnp.swapaxes(mb, -1, -2), g))

    return jax.lax.fori_loop(0, (rank + size - 1) // size, body, g)


_D = 256  # four blocks of 64 columns


def _orthogonal(rng, *shape) -> np.ndarray:
    """Random orthogonal ``[*batch, d, d]`` matrices rounded to float32 (as stored)."""
    q = np.linalg.qr(rng.normal(size=(*shape[:-1], shape[-1], shape[-1])))[0]
    return q.astype(np.float32).astype(np.float64)


def _reference(q: np.ndarray, g: np.ndarray, k: int) -> np.ndarray:
    """Float64 ``G - M M^T G`` with ``M`` the first ``k`` columns of ``q``."""
    m = q[..., :, :k]
    return g - m @ (np.swapaxes(m, -1, -2) @ g)


def _project():
    from rgo_jax.baselines._gpm import project_out_basis

    return jax.jit(project_out_basis)


def test_projection_equals_float64_reference_at_every_rank_one_compile():
    rng = np.random.default_rng(10)
    q = _orthogonal(rng, _D)  # [M | N] for every rank k at once
    g = rng.normal(size=(_D, 5))
    project = _project()
    for k in (0, 1, _D // 2 - 1, _D // 2, _D // 2 + 1, 3 * _D // 4, _D - 1, _D):
        got = np.asarray(project(jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32), k))
        np.testing.assert_allclose(got, _reference(q, g, k), rtol=0, atol=1e-5, err_msg=f"{k}")
        if k == 0:
            np.testing.assert_array_equal(got, g.astype(np.float32))  # the first task
        if k == _D:
            np.testing.assert_array_equal(got, 0.0)  # every direction protected
    assert project._cache_size() == 1  # the rank is traced: one compilation for all


@pytest.mark.parametrize(
    ("k", "read"),
    [(0, ()), (1, (0,)), (127, (0, 1)), (128, (0, 1)), (129, (2, 3)), (250, (3,)), (256, ())],
)
def test_projection_reads_only_the_cheaper_side(k, read):
    """Up to d/2 the blocks of M are read, past it those of N: columns of every other
    block are NaN and must not reach the result."""
    rng = np.random.default_rng(11)
    q = _orthogonal(rng, _D)
    g = rng.normal(size=(_D, 3))
    block = np.arange(_D) // 64
    poisoned = np.where(np.isin(block, read)[None, :], q, np.nan)
    got = _project()(jnp.asarray(poisoned, jnp.float32), jnp.asarray(g, jnp.float32), k)
    np.testing.assert_allclose(np.asarray(got), _reference(q, g, k), rtol=0, atol=1e-5)


@pytest.mark.parametrize("m", [1, 6])
def test_projection_up_to_half_rank_is_bit_identical_to_the_zero_padded_one(m):
    rng = np.random.default_rng(12)
    q = _orthogonal(rng, _D)
    g = jnp.asarray(rng.normal(size=(_D, m)), jnp.float32)
    project, old = _project(), jax.jit(_old_project_out_basis)
    full = jnp.asarray(q, jnp.float32)
    for k in (0, 1, 63, 64, 65, 100, _D // 2):
        padded = jnp.asarray(np.where(np.arange(_D)[None, :] < k, q, 0.0), jnp.float32)
        np.testing.assert_array_equal(project(full, g, k), old(padded, g, k), err_msg=f"{k}")
        np.testing.assert_array_equal(project(padded, g, k), old(padded, g, k))
    # The same under vmap (the harness's seeds), lanes of unequal ranks.
    ks = jnp.asarray([3, 70, _D // 2], jnp.int32)
    fulls = jnp.stack([full] * 3)
    paddeds = jnp.where(jnp.arange(_D)[None, None, :] < ks[:, None, None], fulls, 0.0)
    gs = jnp.stack([g, 2 * g, -g])
    got = jax.jit(jax.vmap(_project()))(fulls, gs, ks)
    np.testing.assert_array_equal(got, jax.jit(jax.vmap(_old_project_out_basis))(paddeds, gs, ks))


def test_zero_padded_basis_past_half_rank_is_still_projected_by_m():
    """A state without complement columns (an earlier version's, or made by hand)."""
    rng = np.random.default_rng(13)
    q = _orthogonal(rng, _D)
    g = rng.normal(size=(_D, 4))
    for k in (129, 200, _D - 1):
        padded = jnp.asarray(np.where(np.arange(_D)[None, :] < k, q, 0.0), jnp.float32)
        got = _project()(padded, jnp.asarray(g, jnp.float32), k)
        np.testing.assert_allclose(np.asarray(got), _reference(q, g, k), rtol=0, atol=1e-5)


@pytest.mark.parametrize("ranks", [(0, 200, _D), (129, 250, _D), (40, 130, 255)])
def test_batched_leaf_with_unequal_ranks(ranks):
    """A stacked leaf [3, d, m] projected through scale_by_gpm: each element with its own
    rank, whichever side the step reads (M up to the largest rank, N from the smallest)."""
    from rgo_jax import layouts as L

    rng = np.random.default_rng(14)
    q = _orthogonal(rng, 3, _D)
    tx = scale_by_gpm(layout=lambda path, leaf: L.stacked(L.DENSE))
    state = tx.init({"w": jnp.zeros((3, _D, 5))})
    state = state._replace(
        bases={"w": jnp.asarray(q, jnp.float32)}, rank={"w": jnp.asarray(ranks, jnp.int32)}
    )
    g = rng.normal(size=(3, _D, 5))
    out, _ = jax.jit(tx.update)({"w": jnp.asarray(g, jnp.float32)}, state)
    for i, k in enumerate(ranks):
        got = np.asarray(out["w"][i])
        np.testing.assert_allclose(got, _reference(q[i], g[i], k), rtol=0, atol=1e-5)
        if k == _D:
            np.testing.assert_array_equal(got, 0.0)
        if k == 0:
            np.testing.assert_array_equal(got, g[i].astype(np.float32))


def test_vmapped_lanes_each_take_their_cheaper_side():
    rng = np.random.default_rng(15)
    ks = (37, 200, _D)
    q = _orthogonal(rng, 3, _D)
    g = rng.normal(size=(3, _D, 3))
    got = jax.jit(jax.vmap(_project()))(
        jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32), jnp.asarray(ks, jnp.int32)
    )
    for i, k in enumerate(ks):
        np.testing.assert_allclose(got[i], _reference(q[i], g[i], k), rtol=0, atol=1e-5)


def test_updates_store_the_complement_of_every_basis():
    """After each of several updates the columns past a rank above d/2 are orthonormal and
    orthogonal to the basis (zero up to d/2), which stays as it was; a zero-padded (earlier
    version's) state gets its complement at its next update. The step then matches the
    float64 reference, for a stacked leaf whose elements have ranks on both sides of d/2."""
    from rgo_jax import layouts as L

    rng = np.random.default_rng(16)
    tx = scale_by_gpm(layout=lambda path, leaf: L.stacked(L.DENSE) if leaf.ndim == 3 else L.DENSE)
    state = tx.init({"blocks": jnp.zeros((2, _D, 3)), "head": jnp.zeros((_D, 4))})
    v = np.linalg.qr(rng.normal(size=(_D, _D)))[0]
    update = jax.jit(tx.update)

    def check(state, ranks, prev_bases, prev_ranks):
        g = {"blocks": rng.normal(size=(2, _D, 3)), "head": rng.normal(size=(1, _D, 4))}
        f32 = {
            "blocks": jnp.asarray(g["blocks"], jnp.float32),
            "head": jnp.asarray(g["head"][0], jnp.float32),
        }
        out, _ = update(f32, state)
        for name, want in ranks.items():
            np.testing.assert_array_equal(state.rank[name], want)
            full = np.asarray(state.bases[name], np.float64).reshape(-1, _D, _D)
            prev = np.asarray(prev_bases[name], np.float64).reshape(-1, _D, _D)
            got = np.asarray(out[name], np.float64).reshape(g[name].shape)
            ks, k0s = np.reshape(want, -1), np.reshape(prev_ranks[name], -1)
            for f, p, k, k0, gi, oi in zip(full, prev, ks, k0s, g[name], got, strict=True):
                if 2 * k > _D:  # [M | N] orthogonal
                    np.testing.assert_allclose(f.T @ f, np.eye(_D), atol=2e-6)
                else:  # zero past the rank, as before N was stored
                    np.testing.assert_allclose(f[:, :k].T @ f[:, :k], np.eye(k), atol=2e-6)
                    np.testing.assert_array_equal(f[:, k:], 0.0)
                np.testing.assert_array_equal(f[:, :k0], p[:, :k0])  # stored M untouched
                np.testing.assert_allclose(oi, _reference(f, gi, k), rtol=0, atol=1e-5)

    ranks = {"head": 0, "blocks": np.array([0, 0])}
    for lo, hi in ((0, 60), (60, 140), (140, 200)):  # head: ranks 60, 140 (> d/2), 200
        rep = _rep(rng, 100, v[:, lo:hi], np.linspace(2.0, 1.0, hi - lo))
        small = _rep(rng, 100, v[:, lo : lo + 10], np.ones(10))
        new = gpm_update_bases(state, {"head": rep, "blocks": np.stack([rep, small])}, 1.0)
        new_ranks = {"head": hi, "blocks": np.array([hi, ranks["blocks"][1] + 10])}
        check(new, new_ranks, state.bases, ranks)
        state, ranks = new, new_ranks
    # An earlier version's state, zero past the rank: an update adding nothing fills it.
    padded = {
        n: np.where(np.arange(_D) < np.asarray(state.rank[n])[..., None, None], state.bases[n], 0)
        for n in ("blocks", "head")
    }
    inside = _rep(rng, 100, v[:, :10], np.ones(10))  # in every basis
    new = gpm_update_bases(
        state._replace(bases=padded), {"head": inside, "blocks": np.stack([inside] * 2)}, 0.9
    )
    check(new, ranks, padded, ranks)
