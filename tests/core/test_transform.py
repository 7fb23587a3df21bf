"""scale_by_rgo as an optax transformation: projection maths, orders, chains, NNX."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rgo_jax
from rgo_jax import layouts


def _params():
    return {
        "dense": {"kernel": jnp.ones((6, 4)), "bias": jnp.ones(4)},
        "conv": {"kernel": jnp.ones((3, 3, 2, 5)), "bias": jnp.ones(5)},
    }


def _grads(seed=0):
    key = jax.random.key(seed)
    leaves, treedef = jax.tree.flatten(_params())
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )


def _consolidated_state(tx, seed=1, n=20):
    rng = np.random.default_rng(seed)
    state = tx.init(_params())
    vecs = {
        "dense": {"kernel": rng.normal(size=(n, 6)), "bias": rng.normal(size=(n, 4))},
        "conv": {"kernel": rng.normal(size=(n, 18)), "bias": rng.normal(size=(n, 5))},
    }
    vecs = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), vecs)
    return rgo_jax.consolidate(state, vecs, 0.5)


@pytest.mark.slow
def test_identity_before_consolidation():
    tx = rgo_jax.scale_by_rgo()
    g = _grads()
    out, _ = tx.update(g, tx.init(_params()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), out, g)


@pytest.mark.slow
def test_update_is_trace_normalised_projection():
    tx = rgo_jax.scale_by_rgo()
    state = _consolidated_state(tx)
    g = _grads()
    out, new_state = tx.update(g, state)
    p = np.asarray(state.p["conv"]["kernel"], np.float64)
    gm = np.asarray(g["conv"]["kernel"]).reshape(18, 5)
    expected = (18 / np.trace(p)) * p @ gm
    np.testing.assert_allclose(out["conv"]["kernel"].reshape(18, 5), expected, rtol=1e-4)
    p = np.asarray(state.p["dense"]["bias"], np.float64)
    expected = (4 / np.trace(p)) * p @ np.asarray(g["dense"]["bias"])
    np.testing.assert_allclose(out["dense"]["bias"], expected, rtol=1e-4)
    # The normalised P has trace d: project the identity matrix.
    eye_out, _ = tx.update(
        {"w": jnp.eye(6)}, tx.init({"w": jnp.eye(6)})._replace(p={"w": state.p["dense"]["kernel"]})
    )
    assert abs(float(jnp.trace(eye_out["w"])) - 6.0) < 1e-4
    # P does not change inside update.
    jax.tree.map(np.testing.assert_array_equal, new_state.p, state.p)


@pytest.mark.slow
def test_projection_shrinks_consolidated_directions_only():
    d, m, alpha, r = 8, 3, 0.01, 2.0
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))
    v = r * q[:, :m].T  # m orthogonal vectors of norm r
    tx = rgo_jax.scale_by_rgo()
    state = tx.init({"w": jnp.zeros((d, 1))})
    state = rgo_jax.update_projection(state, {"w": jnp.asarray(v, jnp.float32)}, alpha)
    shrink = alpha / (alpha + r**2)
    scale = d / (d - m + m * shrink)
    along = q[:, :1]
    out, _ = tx.update({"w": jnp.asarray(along, jnp.float32)}, state)
    np.testing.assert_allclose(out["w"], scale * shrink * along, rtol=2e-3, atol=1e-6)
    ortho = q[:, m : m + 1]
    out, _ = tx.update({"w": jnp.asarray(ortho, jnp.float32)}, state)
    np.testing.assert_allclose(out["w"], scale * ortho, rtol=1e-3, atol=1e-6)


def test_unprojected_biases_and_layout_rules():
    tx = rgo_jax.scale_by_rgo(project_biases=False)
    state = tx.init(_params())
    assert state.p["dense"]["bias"] == optax.MaskedNode()
    assert state.p["dense"]["kernel"].shape == (6, 6)
    tx = rgo_jax.scale_by_rgo(layouts.layout_rules([(r"^dense/", None)]))
    state = tx.init(_params())
    assert state.p["dense"]["kernel"] == optax.MaskedNode()
    assert state.p["conv"]["kernel"].shape == (18, 18)


def test_unknown_leaf_raises_naming_path_and_shape():
    tx = rgo_jax.scale_by_rgo()
    with pytest.raises(ValueError, match=r"'mlp/w3'.*\(2, 3, 4\)"):
        tx.init({"mlp": {"w3": jnp.zeros((2, 3, 4))}})
    # A scalar is left unprojected (its trace-normalised 1 x 1 P is the identity).
    assert tx.init({"scale": jnp.zeros(())}).p["scale"] == optax.MaskedNode()
    with pytest.raises(ValueError, match="no entry for parameter 'b'"):
        rgo_jax.scale_by_rgo(layout={"a": "dense"}).init({"a": jnp.zeros((2, 2)), "b": jnp.ones(2)})
    with pytest.raises(TypeError, match="'a'.*MatrixLayout"):
        rgo_jax.scale_by_rgo(layout={"a": "dens"}).init({"a": jnp.zeros((2, 2))})


def test_custom_layout_over_other_axes():
    # A kernel stored [out, in] (PyTorch order): P over axis 1.
    lay = layouts.MatrixLayout(in_axes=(1,))
    tx = rgo_jax.scale_by_rgo(layout={"w": lay})
    g = jax.random.normal(jax.random.key(0), (3, 5))
    state = tx.init({"w": g})
    assert state.p["w"].shape == (5, 5)
    p = jnp.diag(jnp.arange(1.0, 6.0))
    out, _ = tx.update({"w": g}, state._replace(p={"w": p}))
    np.testing.assert_allclose(out["w"], (5 / 15) * (p @ g.T).T, rtol=1e-5)


# ----- optax interplay beyond the common battery (tests/core/test_optax_battery.py) ------


def test_no_rgo_state_is_a_clear_error():
    with pytest.raises(ValueError, match="no RGOState"):
        rgo_jax.consolidate(optax.sgd(0.1).init(_params()), {})


@pytest.mark.slow
def test_two_orders_with_adam():
    state0 = _consolidated_state(rgo_jax.scale_by_rgo())
    (rstate,) = rgo_jax.rgo_states(state0)
    project = lambda g: rgo_jax.scale_by_rgo().update(g, rstate)[0]  # noqa: E731
    g = _grads()
    # Paper order: project the raw gradient, Adam sees the projected gradient.
    before = optax.chain(rgo_jax.scale_by_rgo(), optax.adam(1e-2))
    s = before.init(_params())
    s = (rstate, s[1])
    u_before, _ = before.update(g, s)
    adam = optax.adam(1e-2)
    expected_before, _ = adam.update(project(g), adam.init(_params()))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u_before, expected_before
    )
    # Adam-NSCL order: Adam's update is projected.
    after = optax.chain(optax.adam(1e-2), rgo_jax.scale_by_rgo())
    s = after.init(_params())
    s = (s[0], rstate)
    u_after, _ = after.update(g, s)
    adam_u, _ = adam.update(g, adam.init(_params()))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5), u_after, project(adam_u))
    # The two differ (Adam is not linear).
    assert not np.allclose(u_before["conv"]["kernel"], u_after["conv"]["kernel"])


@pytest.mark.parametrize("base", [optax.sgd(0.1, momentum=0.9), optax.adamw(1e-3)])
def test_chains_with_common_transformations(base):
    sched = optax.linear_schedule(0.1, 0.01, 10)
    tx = optax.chain(
        optax.clip_by_global_norm(1.0), rgo_jax.scale_by_rgo(), base, optax.scale_by_schedule(sched)
    )
    state = tx.init(_params())
    updates, state = jax.jit(tx.update)(_grads(), state, _params())
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree.leaves(updates))


@pytest.mark.slow
def test_nnx_optimizer_and_consolidation():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, rgo_jax.rgo(0.5), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(1), (8, 5))
    y = jnp.arange(8) % 3

    def loss_fn(m):
        return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

    # Consolidate on a direction, then check the step is the projected SGD step.
    v = {"kernel": jnp.ones((4, 5)), "bias": jnp.ones((4, 3))}
    pure = nnx.as_pure(opt.opt_state)
    pure = rgo_jax.consolidate(pure, v, 0.01)
    nnx.update(opt.opt_state, nnx.state(pure))
    (rstate,) = rgo_jax.rgo_states(nnx.as_pure(opt.opt_state))
    assert int(rstate.num_vectors) == 4
    kernel_before = np.asarray(model.kernel[...])

    @nnx.jit  # the step as one program (eagerly, each of its operations compiles on its own)
    def step(opt, model):
        grads = nnx.grad(loss_fn)(model)
        opt.update(model, grads)
        return grads

    grads = step(opt, model)
    p = np.asarray(rstate.p["kernel"], np.float64)
    expected = kernel_before - 0.5 * (5 / np.trace(p)) * p @ np.asarray(grads["kernel"][...])
    np.testing.assert_allclose(model.kernel[...], expected, rtol=1e-5, atol=1e-6)


# ----- the state as optax's tree tools see it ----------------------------------------------


@pytest.mark.slow
def test_tree_map_params_never_hands_p_to_the_params_function():
    params = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}
    tx = optax.chain(rgo_jax.scale_by_rgo(), optax.adam(1e-2))
    state = rgo_jax.consolidate(tx.init(params), {"w": jnp.ones((2, 4)), "b": jnp.ones((2, 8))})
    seen = []

    def f(x):
        seen.append(x.shape)
        return jnp.zeros((4, 8)) if x.shape == (4, 4) else 2 * x

    mapped = optax.tree_map_params(tx, f, state)
    assert sorted(seen) == sorted([(8,), (4, 8)] * 2)  # Adam's mu and nu only
    (before,), (after,) = rgo_jax.rgo_states(state), rgo_jax.rgo_states(mapped)
    jax.tree.map(np.testing.assert_array_equal, after.p, before.p)
    np.testing.assert_array_equal(mapped[1][0].mu["w"], 2 * state[1][0].mu["w"])


def test_state_specs_from_parameter_specs_leave_p_unsharded_like_its_parameter():
    spec = jax.sharding.PartitionSpec
    params = {"w": jnp.ones((4, 8)), "b": jnp.ones(8)}
    param_specs = {"w": spec(None, "model"), "b": spec("model")}
    tx = optax.chain(rgo_jax.scale_by_rgo(), optax.adam(1e-2))
    specs = optax.tree_map_params(
        tx,
        lambda _, s: s,
        tx.init(params),
        param_specs,
        transform_non_params=lambda _: spec(),
        is_leaf=lambda x: isinstance(x, spec),
    )
    rgo_specs, (adam_specs, _) = specs
    assert rgo_specs.p == spec()  # the d x d P never takes its [in, out] parameter's spec
    assert adam_specs.mu == param_specs and adam_specs.nu == param_specs


def test_inject_hyperparams_with_layout_rules():
    params = {"body": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
    rules = layouts.layout_rules([(r"^head/", None)])
    tx = optax.inject_hyperparams(rgo_jax.rgo)(learning_rate=0.5, layout=rules)
    state = rgo_jax.consolidate(tx.init(params), {"body": {"kernel": jnp.ones((1, 3))}})
    (rstate,) = rgo_jax.rgo_states(state)
    assert rstate.p["head"]["kernel"] == optax.MaskedNode()
    assert float(state.hyperparams["learning_rate"]) == 0.5
    g = {"body": {"kernel": jnp.ones((3, 2))}, "head": {"kernel": jnp.ones((2, 2))}}
    u, _ = jax.jit(tx.update)(g, state)
    np.testing.assert_allclose(u["head"]["kernel"], -0.5 * g["head"]["kernel"])
    p = np.asarray(rstate.p["body"]["kernel"], np.float64)
    np.testing.assert_allclose(
        u["body"]["kernel"], -0.5 * 3 / np.trace(p) * p @ np.ones((3, 2)), rtol=1e-5
    )


@pytest.mark.parametrize(
    "alpha, error",
    [
        (-1.0, "alpha must be positive"),
        (0.0, "alpha must be positive"),
        (float("nan"), "alpha must be positive"),
        (jnp.asarray(-0.5), "alpha must be positive"),
        (jnp.asarray(0.0), "alpha must be positive"),
        (jnp.asarray(jnp.nan), "alpha must be positive"),
        (np.asarray([0.1, 0.2]), r"alpha must be a scalar .* shape \(2,\)"),
        (jnp.full((5,), 0.1), r"alpha must be a scalar .* shape \(5,\)"),
        ({"w": 0.1}, "no entry for projected parameter 'b'"),
        ({"w": 0.1, "b": -1.0}, "alpha must be positive"),
    ],
)
def test_alpha_is_validated(alpha, error):
    tx = rgo_jax.scale_by_rgo()
    state = tx.init({"w": jnp.ones((3, 2)), "b": jnp.ones(2)})
    vecs = {"w": jnp.ones((5, 3)), "b": jnp.ones((5, 2))}
    with pytest.raises(ValueError, match=error):
        rgo_jax.consolidate(state, vecs, alpha)


def test_alpha_per_layer_equals_separate_consolidations():
    params = {"w": jnp.ones((3, 2)), "v": jnp.ones((3, 2))}
    rng = np.random.default_rng(0)
    vecs = {k: jnp.asarray(rng.normal(size=(4, 3)), jnp.float32) for k in params}
    state = rgo_jax.scale_by_rgo().init(params)
    both = rgo_jax.consolidate(state, vecs, {"w": 0.1, "v": 2.0})
    for name, a in (("w", 0.1), ("v", 2.0)):
        v64 = np.asarray(vecs[name], np.float64)
        ref = a * np.linalg.inv(a * np.eye(3) + v64.T @ v64)
        np.testing.assert_allclose(both.p[name], ref, rtol=1e-4, atol=1e-6)
