"""Sharded RGO on 4 host devices: Auto and Explicit meshes, and inside ``shard_map``.

Every result is compared with the same computation on one device. FEL on a sharded feature
axis is checked bitwise (``assert_array_equal``: a permutation only moves values). The
others reduce over devices in another order or split P's products: steps are compared with
``rtol=1e-5, atol=1e-6`` and consolidations with ``rtol=1e-4, atol=1e-6``. Measured on jax
0.10.2 (max abs difference): steps 3e-8, block consolidation 3e-8 (batch-sharded vectors)
and 2e-8 (row-sharded P), sequential consolidation 0 (batch-sharded vectors, bitwise) and
4e-9 (row-sharded P), the same on Auto and Explicit meshes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import rgo_jax
from rgo_jax import sharding

pytestmark = pytest.mark.skipif(len(jax.devices()) < 4, reason="needs 4 (host) devices")

KINDS = ["auto", "explicit", "explicit_ctx"]  # explicit_ctx: under jax.set_mesh, as in the docs
STEP_KINDS = ["auto", "explicit_ctx"]
STEP_TOL = dict(rtol=1e-5, atol=1e-6)
ROWS_TOL = dict(rtol=1e-4, atol=1e-6)


def make_mesh(kind, shape=(4,), names=("data",)):
    axis_type = AxisType.Auto if kind == "auto" else AxisType.Explicit
    devices = jax.devices()[: int(np.prod(shape))]
    return jax.make_mesh(shape, names, axis_types=(axis_type,) * len(shape), devices=devices)


def in_context(kind, mesh):
    """``jax.set_mesh(mesh)`` for the explicit_ctx kind, else no context."""
    import contextlib

    return jax.set_mesh(mesh) if kind == "explicit_ctx" else contextlib.nullcontext()


def assert_tree(a, b, tol=None):
    if tol is None:
        jax.tree.map(np.testing.assert_array_equal, a, b)
    else:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


def spec_of(x):
    return jax.typeof(x).sharding.spec if hasattr(jax, "typeof") else x.sharding.spec


def replicated(x):
    return x.sharding.is_fully_replicated


class Net(nnx.Module):
    """16 -> 16 (ReLU, FEL) -> 8: P's of 16, 16, 16 and 8 (all divisible by 4).

    Two sizes (two size buckets in every consolidation, each compiled once per program):
    16 is at the row-sharding threshold of the row-sharded tests, 8 below it."""

    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 16, rngs=rngs)
        self.fel = rgo_jax.FEL(layer=0, seed=3)
        self.l2 = nnx.Linear(16, 8, rngs=rngs)

    def __call__(self, x, task):
        return self.l2(self.fel(jax.nn.relu(self.l1(x)), task))


def _vectors(state_p, rng, n):
    return jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(n, p.shape[-1])), jnp.float32), state_p
    )


class Problem:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.graph, self.params, self.rest = nnx.split(Net(nnx.Rngs(0)), nnx.Param, ...)
        self.x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
        self.y = jnp.asarray(rng.integers(0, 8, size=8), jnp.int32)
        self.tx = rgo_jax.rgo(0.1)
        state = self.tx.init(self.params)
        self.state = rgo_jax.consolidate(state, _vectors(state[0].p, rng, 16), 0.1)
        self.vecs = _vectors(state[0].p, rng, 16)  # 4 per device
        self.vecs64 = _vectors(state[0].p, np.random.default_rng(1), 64)  # 16 per device
        self.rng = rng

    def loss(self, params, x, y):
        logits = nnx.merge(self.graph, params, self.rest)(x, 1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def step(self, params, state, x, y):
        g = jax.grad(self.loss)(params, x, y)
        u, state = self.tx.update(g, state, params)
        return optax.apply_updates(params, u), state


@pytest.fixture(scope="module")
def prob():
    return Problem()


@pytest.fixture(scope="module")
def ref_step(prob):
    return jax.jit(prob.step)(prob.params, prob.state, prob.x, prob.y)


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.slow
def test_data_parallel_step_equals_single_device(prob, ref_step, kind):
    mesh = make_mesh(kind)
    with in_context(kind, mesh):
        xs, ys = sharding.shard_batch((prob.x, prob.y), mesh)
        assert len(xs.addressable_shards) == 4 and xs.addressable_shards[0].data.shape == (2, 16)
        sp, ss = sharding.replicate_state((prob.params, prob.state), mesh)
        new_params, new_state = jax.jit(prob.step)(sp, ss, xs, ys)
    assert_tree(new_params, ref_step[0], STEP_TOL)
    assert replicated(new_params["l1"]["kernel"])
    # The step really moved the parameters, and differently from plain SGD (P != I).
    moved = np.asarray(new_params["l1"]["kernel"]) - np.asarray(prob.params["l1"]["kernel"])
    assert np.abs(moved).max() > 1e-4


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.slow
def test_sharded_curvature_vectors_equal_single_device(prob, kind):
    def vectors(params, xb, yb):  # [nb, B, ...] -> [nb, ...] per-batch curvature vectors
        model_fn = lambda p, x: nnx.merge(prob.graph, p, prob.rest)(x, 1)  # noqa: E731
        one = lambda x, y: rgo_jax.curvature_vectors(model_fn, params, x, y)  # noqa: E731
        return jax.tree.map(lambda v: v[:, 0], jax.vmap(one)(xb, yb))

    vectors = jax.jit(vectors)
    xb = jnp.asarray(prob.rng.normal(size=(4, 8, 16)), jnp.float32)  # 4 batches of 8
    yb = jnp.asarray(prob.rng.integers(0, 8, size=(4, 8)), jnp.int32)
    ref = vectors(prob.params, xb, yb)
    mesh = make_mesh(kind)
    with in_context(kind, mesh):
        rparams = sharding.replicate_state(prob.params, mesh)
        # Batches spread over devices: each device computes one batch's vector.
        sv = vectors(rparams, *sharding.shard_batch((xb, yb), mesh))
        # Each batch's samples spread over devices: the batch-summed vector is reduced.
        by_sample = NamedSharding(mesh, P(None, "data"))
        sv2 = vectors(rparams, jax.device_put(xb, by_sample), jax.device_put(yb, by_sample))
    assert not sv["l1"]["kernel"].sharding.is_fully_replicated
    assert_tree(sv, ref, STEP_TOL)
    assert_tree(sv2, ref, STEP_TOL)


@pytest.fixture(scope="module")
def ref_p(prob):
    """One-device consolidations of prob.vecs into prob.state, by method."""
    return {
        m: rgo_jax.rgo_states(rgo_jax.consolidate(prob.state, prob.vecs, 0.1, method=m))[0].p
        for m in ("block", "sequential")
    }


@pytest.mark.parametrize("method", ["block", "sequential"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.slow
def test_consolidation_with_batch_sharded_vectors(prob, ref_p, kind, method):
    mesh = make_mesh(kind)
    with in_context(kind, mesh):
        sv = sharding.shard_batch(prob.vecs, mesh)
        rs = sharding.replicate_state(prob.state, mesh)
        out = rgo_jax.consolidate(rs, sv, 0.1, method=method)
    assert_tree(rgo_jax.rgo_states(out)[0].p, ref_p[method], ROWS_TOL)
    assert replicated(rgo_jax.rgo_states(out)[0].p["l2"]["kernel"])
    assert int(rgo_jax.rgo_states(out)[0].num_vectors) == 32
    # The vectors moved P (independent check: not the input state).
    before = np.asarray(rgo_jax.rgo_states(prob.state)[0].p["l1"]["kernel"])
    assert np.abs(np.asarray(rgo_jax.rgo_states(out)[0].p["l1"]["kernel"]) - before).max() > 1e-3


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.slow
def test_row_sharded_projection_step_and_consolidation(prob, ref_step, ref_p, kind):
    mesh = make_mesh(kind)
    rows = P("data", None)
    with in_context(kind, mesh):
        sstate = sharding.shard_projection_rows(prob.state, mesh, min_dim=16)
        p_sharded = rgo_jax.rgo_states(sstate)[0].p
        assert p_sharded["l1"]["kernel"].sharding.spec == rows  # 16 x 16: 16 >= min_dim
        assert p_sharded["l2"]["kernel"].sharding.spec == rows  # 16 x 16
        assert replicated(p_sharded["l2"]["bias"])  # 8 < min_dim
        assert len(p_sharded["l2"]["kernel"].addressable_shards[0].data) == 4
        rparams = sharding.replicate_state(prob.params, mesh)
        xs, ys = sharding.shard_batch((prob.x, prob.y), mesh)
        out_params, _ = jax.jit(prob.step)(rparams, sstate, xs, ys)
        # Pinned output shardings: params stay replicated, P stays row-sharded, same numbers.
        pinned = jax.jit(prob.step, out_shardings=sharding.shardings_of((rparams, sstate)))
        pp, ps = pinned(rparams, sstate, xs, ys)
        out = rgo_jax.consolidate(sstate, prob.vecs, 0.1)
        out_seq = rgo_jax.consolidate(sstate, prob.vecs, 0.1, method="sequential")
    assert_tree(out_params, ref_step[0], STEP_TOL)
    assert_tree(pp, ref_step[0], STEP_TOL)
    assert replicated(pp["l1"]["kernel"])
    assert rgo_jax.rgo_states(ps)[0].p["l1"]["kernel"].sharding.spec == rows
    if kind != "auto":  # Explicit: the update takes the gradient's type, no pinning needed
        assert replicated(out_params["l1"]["kernel"])
    assert_tree(rgo_jax.rgo_states(out)[0].p, ref_p["block"], ROWS_TOL)
    assert_tree(rgo_jax.rgo_states(out_seq)[0].p, ref_p["sequential"], ROWS_TOL)
    assert rgo_jax.rgo_states(out)[0].p["l2"]["kernel"].sharding.spec == rows  # stays sharded


@pytest.mark.parametrize("kind", KINDS)
def test_fel_on_a_feature_axis_sharded_over_model(kind):
    mesh = make_mesh(kind, (2, 2), ("data", "model"))
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 3, 8)), jnp.float32)
    key = jax.random.key(5)
    ref = rgo_jax.permute_features(x, key, 1, 3)
    perm = np.asarray(rgo_jax.fel_permutation(key, 1, 3, 8))
    np.testing.assert_array_equal(ref, np.asarray(x)[..., perm])
    spec = P("data", None, "model")
    with in_context(kind, mesh):
        xs = jax.device_put(x, NamedSharding(mesh, spec))
        y = rgo_jax.permute_features(xs, key, 1, 3)
        yj = jax.jit(lambda x, t: rgo_jax.permute_features(x, key, 1, t))(xs, jnp.int32(3))
        back = rgo_jax.permute_features(yj, key, 1, 3, inverse=True)
        fel = rgo_jax.FEL(layer=1, seed=5)
        ym = nnx.jit(lambda m, x: m(x, 3))(fel, xs)
    for out in (y, yj, ym):
        np.testing.assert_array_equal(out, ref)  # bitwise: a permutation moves values only
    np.testing.assert_array_equal(back, x)
    if kind != "auto":
        assert yj.sharding.spec == spec


# ---------------------------------------------------------------- inside shard_map


@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.slow
def test_data_parallel_step_inside_shard_map(prob, ref_step, kind):
    mesh = make_mesh(kind)

    def local_step(params, state, x, y):
        # The global mean loss: the gradient of replicated (invariant) params is summed over
        # devices by the transpose of shard_map's implicit broadcast (check_vma=True).
        n = jax.lax.axis_size("data")
        g = jax.grad(lambda p: prob.loss(p, x, y) / n)(params)
        u, state = prob.tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    fn = jax.jit(
        jax.shard_map(
            local_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P()
        )
    )
    sp, ss = sharding.replicate_state((prob.params, prob.state), mesh)
    new_params, _ = fn(sp, ss, *sharding.shard_batch((prob.x, prob.y), mesh))
    assert_tree(new_params, ref_step[0], STEP_TOL)


@pytest.mark.parametrize("method", ["block", "sequential"])
@pytest.mark.parametrize("kind", ["auto", "explicit"])
@pytest.mark.slow
def test_consolidation_inside_shard_map(prob, ref_p, kind, method):
    """Gathered vectors give the one-device P (replicated, checked by check_vma); each
    device's own vectors give each device the P of its shard."""
    mesh = make_mesh(kind)
    rs = sharding.replicate_state(prob.state, mesh)
    sv = sharding.shard_batch(prob.vecs, mesh)

    def gathered(state, v):
        v = jax.lax.all_gather(v, "data", tiled=True, to="invarying")
        return rgo_jax.consolidate(state, v, 0.1, method=method)

    out = jax.jit(jax.shard_map(gathered, mesh=mesh, in_specs=(P(), P("data")), out_specs=P()))(
        rs, sv
    )
    assert_tree(rgo_jax.rgo_states(out)[0].p, ref_p[method], ROWS_TOL)

    def local(state, v):  # per-device P, stacked on a new leading axis
        out = rgo_jax.consolidate(state, v, 0.1, method=method)
        return jax.tree.map(lambda a: a[None], out)

    # 16 vectors per device: each device's reference is a consolidation of as many vectors
    # as prob.vecs, whose one-device program ref_p has compiled already.
    per_device = jax.jit(
        jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")), out_specs=P("data"))
    )(rs, sharding.shard_batch(prob.vecs64, mesh))
    for i in range(4):
        shard = jax.tree.map(lambda v, i=i: v[16 * i : 16 * (i + 1)], prob.vecs64)
        want = rgo_jax.rgo_states(rgo_jax.consolidate(prob.state, shard, 0.1, method=method))[0]
        got = jax.tree.map(lambda a, i=i: np.asarray(a)[i], rgo_jax.rgo_states(per_device)[0].p)
        assert_tree(got, want.p, ROWS_TOL)


def test_fel_inside_shard_map_over_the_batch():
    mesh = make_mesh("explicit")
    x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 6)), jnp.float32)
    key = jax.random.key(2)
    fn = jax.shard_map(
        lambda x: rgo_jax.permute_features(x, key, 0, 2),
        mesh=mesh,
        in_specs=P("data"),
        out_specs=P("data"),
    )
    out = jax.jit(fn)(jax.device_put(x, NamedSharding(mesh, P("data"))))
    np.testing.assert_array_equal(out, rgo_jax.permute_features(x, key, 0, 2))


# ---------------------------------------------------------------- state shardings


@pytest.mark.slow
def test_state_shardings_never_give_p_its_parameters_spec():
    mesh = make_mesh("explicit", (2, 2), ("data", "model"))
    params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8), "emb": jnp.ones((4, 8))}
    param_shardings = {
        "w": NamedSharding(mesh, P(None, "model")),
        "b": NamedSharding(mesh, P("model")),
        "emb": NamedSharding(mesh, P("data", "model")),
    }
    layout = rgo_jax.layouts.layout_rules([(r"^emb$", None)])
    tx = optax.chain(rgo_jax.scale_by_rgo(layout), optax.adam(1e-3))
    shapes = jax.eval_shape(tx.init, params)
    out = sharding.state_shardings(shapes, mesh, tx=tx, param_shardings=param_shardings)
    rgo_s, (adam_s, _) = out
    assert rgo_s.p["w"].spec == P() and rgo_s.p["b"].spec == P()
    assert isinstance(rgo_s.p["emb"], optax.MaskedNode)  # unprojected: nothing to shard
    assert adam_s.mu["w"].spec == P(None, "model") and adam_s.nu["emb"].spec == P("data", "model")
    assert adam_s.count.spec == P()
    rows = sharding.state_shardings(
        shapes, mesh, tx=tx, param_shardings=param_shardings, row_axis="model", min_dim=8
    )
    assert rows[0].p["w"].spec == P("model", None)  # 16 x 16
    assert rows[0].p["b"].spec == P("model", None)  # 8 x 8
    assert isinstance(rows[0].p["emb"], optax.MaskedNode)  # unprojected: nothing to shard
    # Usable as the out_shardings of init and as the placement of a training step.
    with jax.set_mesh(mesh):
        sparams = jax.device_put(params, param_shardings)
        state = jax.jit(tx.init, out_shardings=rows)(sparams)
        assert state[0].p["w"].sharding.spec == P("model", None)
        grads = jax.tree.map(jnp.ones_like, sparams)
        u, _ = jax.jit(tx.update)(grads, state, sparams)
    ref_u, _ = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)
    assert_tree(u, ref_u, STEP_TOL)
    assert u["w"].sharding.spec == P(None, "model")  # the update keeps the gradient's spec
    # Stacked P: the layer axes stay unsharded, the rows follow row_axis.
    stacked = rgo_jax.scale_by_rgo({"s": rgo_jax.layouts.stacked(rgo_jax.layouts.DENSE)})
    s_shape = jax.eval_shape(stacked.init, {"s": jnp.ones((3, 8, 4))})
    assert sharding.state_shardings(s_shape, mesh, row_axis="data", min_dim=8).p["s"].spec == P(
        None, "data", None
    )


def test_state_shardings_and_mesh_errors():
    mesh = make_mesh("explicit")
    with pytest.raises(ValueError, match="pass tx and param_shardings together"):
        sharding.state_shardings({}, mesh, tx=optax.sgd(0.1))
    with pytest.raises(ValueError, match="no axis named 'model'"):
        sharding.state_shardings({}, mesh, row_axis="model")
    with pytest.raises(TypeError, match="expects a jax.sharding.Mesh"):
        sharding.state_shardings({}, "data")
    with pytest.raises(ValueError, match="no devices"):
        sharding.data_mesh([])


def test_data_mesh_follows_jax_make_mesh():
    mesh = sharding.data_mesh(jax.devices()[:4])
    assert mesh.axis_types == jax.make_mesh((4,), ("data",)).axis_types
    auto = sharding.data_mesh(jax.devices()[:4], axis_type=AxisType.Auto)
    assert auto.axis_types == (AxisType.Auto,) and auto.shape["data"] == 4


def test_shard_batch_rejects_indivisible_batch():
    mesh = sharding.data_mesh(jax.devices()[:4])
    with pytest.raises(ValueError, match=r"'1' has shape \(10,\).*divisible by the 4 devices"):
        sharding.shard_batch((jnp.ones((8, 2)), jnp.ones(10)), mesh)
    with pytest.raises(ValueError, match="no axis named 'model'"):
        sharding.shard_batch(jnp.ones(8), mesh, axis_name="model")
    with pytest.raises(ValueError, match="no RGOState"):
        sharding.shard_projection_rows({"a": jnp.ones(2)}, mesh)
