"""The fast per-step projections of GPM and OWM equal the plain dense forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from rgo_jax.baselines import agem, scale_by_gpm, scale_by_owm
from rgo_jax.baselines._gpm import project_out_basis


def _padded_basis(rng, batch, d, k):
    q = np.linalg.qr(rng.normal(size=(*batch, d, d)))[0]
    q[..., :, k:] = 0.0
    return q


@pytest.mark.parametrize(
    ("batch", "d", "m", "k"),
    [((), 300, 7, 0), ((), 300, 7, 1), ((), 301, 7, 150), ((), 301, 7, 301), ((2,), 130, 3, 129)],
)
def test_blocked_basis_projection_equals_dense_form(batch, d, m, k):
    rng = np.random.default_rng(k)
    q = _padded_basis(rng, batch, d, k)
    g = rng.normal(size=(*batch, d, m))
    want = g - q @ (np.swapaxes(q, -1, -2) @ g)  # float64, every padded column
    got = jax.jit(project_out_basis)(
        jnp.asarray(q, jnp.float32), jnp.asarray(g, jnp.float32), jnp.int32(k)
    )
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=2e-5)


def test_gpm_update_projects_with_the_rank_of_each_leaf():
    rng = np.random.default_rng(0)
    params = {"a": {"kernel": jnp.zeros((260, 4))}, "b": {"kernel": jnp.zeros((20, 3))}}
    tx = scale_by_gpm()
    state = tx.init(params)
    ranks = {"a": 131, "b": 5}
    bases = {
        n: {
            "kernel": jnp.asarray(
                _padded_basis(rng, (), p["kernel"].shape[0], ranks[n]), jnp.float32
            )
        }
        for n, p in params.items()
    }
    state = state._replace(
        bases=bases, rank={n: {"kernel": jnp.int32(r)} for n, r in ranks.items()}
    )
    g = {
        n: {"kernel": jnp.asarray(rng.normal(size=p["kernel"].shape), jnp.float32)}
        for n, p in params.items()
    }
    out, _ = jax.jit(tx.update)(g, state)
    for n in params:
        m = np.asarray(bases[n]["kernel"], np.float64)
        gn = np.asarray(g[n]["kernel"], np.float64)
        np.testing.assert_allclose(
            np.asarray(out[n]["kernel"]), gn - m @ (m.T @ gn), rtol=0, atol=2e-5
        )


@pytest.mark.parametrize("make", [lambda: scale_by_owm(), lambda: scale_by_gpm(), agem])
def test_state_can_be_donated(make):
    params = {"w": jnp.ones((3, 2))}
    tx = optax.chain(make(), optax.sgd(0.1))

    @jax.jit
    def step(params, state):
        u, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        return optax.apply_updates(params, u), state

    step = jax.jit(step, donate_argnums=(0, 1))
    p, s = step(params, tx.init(params))  # no "donate the same buffer twice"
    assert jax.tree.leaves(p)[0].shape == (3, 2)


def test_gpm_update_under_vmap_with_different_ranks_per_lane():
    # The harness vmaps the step over seeds: each lane has its own rank (a batched trip count).
    rng = np.random.default_rng(3)
    d, m = 140, 3
    tx = scale_by_gpm()
    params = {"w": jnp.zeros((d, m))}
    lanes = []
    for k in (0, 37, 140):
        q = jnp.asarray(_padded_basis(rng, (), d, k), jnp.float32)
        lanes.append(tx.init(params)._replace(bases={"w": q}, rank={"w": jnp.int32(k)}))
    g = jnp.asarray(rng.normal(size=(3, d, m)), jnp.float32)
    state = jax.tree.map(lambda *xs: jnp.stack(xs), *lanes)
    out, _ = jax.jit(jax.vmap(tx.update))({"w": g}, state)
    for i, lane in enumerate(lanes):
        q = np.asarray(lane.bases["w"], np.float64)
        gi = np.asarray(g[i], np.float64)
        np.testing.assert_allclose(np.asarray(out["w"][i]), gi - q @ (q.T @ gi), atol=2e-5)
