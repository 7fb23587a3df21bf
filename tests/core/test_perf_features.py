"""Performance features: input-side projection, fast curvature vectors.

These tests check results (against float64 references and the plain single-device path),
never timings. The sharding tests are in test_sharding.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import rgo_jax
from rgo_jax import projected_matmul
from rgo_jax.bench.models import MLP
from rgo_jax.nnx import use_input_projection, use_reduced_kernel_gradients
from tests.helpers import built_in_one_program


def _spd(rng, d, n=None, alpha=0.1):
    """A consolidated-looking P = alpha (alpha I + V^T V)^-1 in float64."""
    v = rng.normal(size=(n or 2 * d, d)) / np.sqrt(d)
    return alpha * np.linalg.inv(alpha * np.eye(d) + v.T @ v)


# ---------------------------------------------------------------- input-side projection


@pytest.mark.parametrize("n", [3, 12])  # n < m (input side) and n >= m (output side)
def test_projected_matmul_matches_float64_reference(n):
    rng = np.random.default_rng(0)
    d, m = 7, 5
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, m))
    p = _spd(rng, d)
    dy = rng.normal(size=(n, m))
    y, vjp = jax.vjp(
        lambda x, w: projected_matmul(x, w, jnp.asarray(p, jnp.float32)),
        jnp.asarray(x, jnp.float32),
        jnp.asarray(w, jnp.float32),
    )
    dx, dw = vjp(jnp.asarray(dy, jnp.float32))
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, dy @ w.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, d / np.trace(p) * p @ x.T @ dy, rtol=1e-4, atol=1e-5)


def test_projected_matmul_leading_axes_and_constant_p():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)  # [..., d] with two lead axes
    w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    p = _spd(rng, 4)
    dw = jax.grad(lambda w: jnp.sum(projected_matmul(x, w, jnp.asarray(p, jnp.float32)) ** 2))(w)
    xs = np.asarray(x, np.float64).reshape(6, 4)
    dy = 2 * xs @ np.asarray(w, np.float64)
    np.testing.assert_allclose(dw, 4 / np.trace(p) * p @ xs.T @ dy, rtol=1e-4, atol=1e-5)
    # P is a constant: no gradient flows into it.
    dp = jax.grad(lambda p: jnp.sum(projected_matmul(x, w, p)))(jnp.asarray(p, jnp.float32))
    assert not np.any(np.asarray(dp))


def test_projected_matmul_bfloat16_p():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(3, 8)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
    p = _spd(rng, 8)
    g16 = jax.grad(lambda w: projected_matmul(x, w, jnp.asarray(p, jnp.bfloat16)).sum())(w)
    ref = 8 / np.trace(p) * p @ np.asarray(x, np.float64).T @ np.ones((3, 16))
    assert g16.dtype == jnp.float32
    np.testing.assert_allclose(g16, ref, rtol=2e-2, atol=2e-2)


def test_projected_matmul_shape_errors():
    with pytest.raises(ValueError, match=r"P has shape \(3, 3\), expected \(4, 4\)"):
        projected_matmul(jnp.ones((2, 4)), jnp.ones((4, 5)), jnp.eye(3))
    with pytest.raises(ValueError, match="does not end in the kernel's input size 4"):
        projected_matmul(jnp.ones((2, 3)), jnp.ones((4, 5)), jnp.eye(4))


class _MLPProblem:
    """A small paper-style MLP (16-16-9-5, FEL on) with a consolidated RGO state.

    Its P's come in three sizes (16, 9, 5): three RLS buckets per consolidation."""

    def __init__(self):
        model = built_in_one_program(lambda: MLP(16, (16, 9), 5, rngs=nnx.Rngs(0)))
        self.graph, self.params, self.rest = nnx.split(model, nnx.Param, ...)
        self.rng = rng = np.random.default_rng(0)
        # Batch 8: n < m for hidden/0 (16) and hidden/1 (9), n >= m for the head (5), so
        # both associations of the input-side product are exercised.
        self.x = jnp.asarray(rng.normal(size=(8, 16)), jnp.float32)
        self.y = jnp.asarray(rng.integers(0, 5, size=8), jnp.int32)
        self.tx = rgo_jax.rgo(0.1)
        state = self.tx.init(self.params)
        self.state = rgo_jax.consolidate(state, _random_vectors(state[0].p, rng, 30), 0.1)

    def loss(self, params, x, y, mats=None):
        model = nnx.merge(self.graph, params, self.rest)
        if mats is None:
            logits = model(x, 1)
        else:
            with use_input_projection(model, mats):
                logits = model(x, 1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _random_vectors(state_p, rng, n):
    return jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(n, p.shape[-1])), jnp.float32), state_p
    )


@pytest.fixture(scope="module")
def mlp():
    return _MLPProblem()


def _input_projected_state(tx, state, params):
    """``tx.init(params)`` holding the matrices of ``state`` (the same leaves, marked)."""
    fresh = tx.init(params)
    assert [x.shape for x in jax.tree.leaves(fresh)] == [x.shape for x in jax.tree.leaves(state)]
    return jax.tree.unflatten(jax.tree.structure(fresh), jax.tree.leaves(state))


@pytest.mark.slow
def test_input_projected_step_equals_plain_rgo_step(mlp):
    plain, fast = mlp.tx, rgo_jax.rgo(0.1, input_projected=r"kernel$")
    # The same leaves as scale_by_rgo's state (one P per leaf): consolidate and checkpoints
    # carry over; the input-projected P are marked in the structure.
    fast_state = _input_projected_state(fast, mlp.state, mlp.params)

    @jax.jit
    def steps(params, state, fast_state, x, y):
        g = jax.grad(mlp.loss)(params, x, y)
        u_plain, _ = plain.update(g, state, params)
        g_in = jax.grad(mlp.loss)(params, x, y, fast_state)
        u_fast, _ = fast.update(g_in, fast_state, params)
        return u_plain, u_fast, g

    u_plain, u_fast, g = steps(mlp.params, mlp.state, fast_state, mlp.x, mlp.y)
    assert min(float(jnp.max(jnp.abs(u))) for u in jax.tree.leaves(u_plain)) > 1e-4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), u_fast, u_plain
    )
    # Independent check of one kernel against float64: -lr * (d / tr P) P G.
    p = np.asarray(mlp.state[0].p["hidden"][0]["kernel"], np.float64)
    expected = -0.1 * 16 / np.trace(p) * p @ np.asarray(g["hidden"][0]["kernel"], np.float64)
    np.testing.assert_allclose(u_fast["hidden"][0]["kernel"], expected, rtol=1e-4, atol=1e-7)
    assert not np.allclose(expected, -0.1 * np.asarray(g["hidden"][0]["kernel"]), atol=1e-5)
    # Consolidating the marked state updates the same matrices as the plain one (30 vectors,
    # as the fixture's: the plain consolidation reuses its compiled program).
    vecs = _random_vectors(mlp.state[0].p, np.random.default_rng(5), 30)
    a = rgo_jax.consolidate(mlp.state, vecs, 0.1)
    b = rgo_jax.consolidate(fast_state, vecs, 0.1)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.leaves(a), jax.tree.leaves(b))


@pytest.mark.slow
def test_use_input_projection_with_nnx_grad_restores_layers(mlp):
    model = nnx.merge(mlp.graph, mlp.params, mlp.rest)
    tx = rgo_jax.rgo(0.1, input_projected=r"hidden/1/kernel")
    state = rgo_jax.consolidate(
        tx.init(nnx.as_pure(mlp.params)),
        _random_vectors(mlp.state[0].p, np.random.default_rng(3), 20),
        0.1,
    )
    p = np.asarray(state[0].p["hidden"][1]["kernel"].value, np.float64)
    assert not np.allclose(p, np.eye(16), atol=1e-3)

    def loss(model, state, project):
        if not project:
            logits = model(mlp.x, 1)
        else:
            with use_input_projection(model, state):
                logits = model(mlp.x, 1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, mlp.y).mean()

    grad = nnx.jit(nnx.grad(loss), static_argnums=2)
    g_proj, g_plain = grad(model, state, True), grad(model, state, False)
    np.testing.assert_allclose(
        g_proj["hidden"][1]["kernel"][...],
        16 / np.trace(p) * p @ np.asarray(g_plain["hidden"][1]["kernel"][...], np.float64),
        rtol=1e-4,
        atol=1e-6,
    )
    np.testing.assert_allclose(  # other layers untouched
        g_proj["hidden"][0]["kernel"][...], g_plain["hidden"][0]["kernel"][...], rtol=1e-5
    )
    assert model.hidden[1].dot_general is jax.lax.dot_general  # restored after the block
    # The update passes the (already projected) kernel gradient through, projects the rest.
    u, _ = jax.jit(tx.update)(nnx.as_pure(nnx.state(g_proj)), state)
    np.testing.assert_allclose(
        u["hidden"][1]["kernel"], -0.1 * g_proj["hidden"][1]["kernel"][...], rtol=1e-6
    )


@pytest.mark.slow
def test_input_projection_errors_name_the_problem(mlp):
    graph, params, rest = mlp.graph, mlp.params, mlp.rest
    with pytest.raises(ValueError, match="'head/bias'.*only dense kernels"):
        rgo_jax.scale_by_rgo(input_projected=r"head/").init(params)
    with pytest.raises(ValueError, match="matches none"):
        rgo_jax.scale_by_rgo(input_projected=r"nothing_like_this").init(params)
    with pytest.raises(TypeError, match="regex string or a callable"):
        rgo_jax.scale_by_rgo(input_projected=3)
    model = nnx.merge(graph, params, rest)
    other = rgo_jax.scale_by_rgo(input_projected="kernel").init({"fc9": {"kernel": jnp.eye(3)}})
    with pytest.raises(ValueError, match=r"kernel path\(s\) \['fc9/kernel'\]"):
        with use_input_projection(model, other):
            pass
    small = rgo_jax.scale_by_rgo(input_projected="kernel").init(
        {"hidden": [{"kernel": jnp.eye(3)}]}
    )
    with pytest.raises(ValueError, match=r"'hidden/0/kernel' has shape \(3, 3\), expected"):
        with use_input_projection(model, small):
            pass
    assert model.hidden[0].dot_general is jax.lax.dot_general
    with pytest.raises(ValueError, match="holds no input-projected P"):
        with use_input_projection(model, optax.sgd(0.1).init(params)):
            pass


# ---------------------------------------------------------------- fast curvature vectors


class _ConvNet(nnx.Module):
    """Conv (stride 2, SAME) -> ReLU -> Conv (VALID) -> mean pool -> Linear."""

    def __init__(self, rngs):
        self.c1 = nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(4, 6, (2, 2), padding="VALID", rngs=rngs)
        self.head = nnx.Linear(6, 5, rngs=rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.c1(x))
        h = jax.nn.relu(self.c2(h))
        return self.head(jnp.mean(h, axis=(1, 2)))


def _vectors_both_ways(model, xs, ys, **kw):
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    args = (1,) if isinstance(model, MLP) else ()

    def plain(p, x):
        return nnx.merge(graph, p, rest)(x, *args)

    def fast(p, x):
        m = nnx.merge(graph, p, rest)
        with use_reduced_kernel_gradients(m):
            return m(x, *args)

    ref = jax.jit(lambda p: rgo_jax.curvature_vectors(plain, p, xs, ys, **kw))(params)
    out = jax.jit(lambda p: rgo_jax.curvature_vectors(fast, p, xs, ys, **kw))(params)
    return ref, out, plain, params


@pytest.mark.slow
def test_reduced_kernel_gradients_give_the_same_vectors_dense(mlp):
    xs = jnp.asarray(mlp.rng.normal(size=(6, 4, 16)), jnp.float32)
    ys = jnp.asarray(mlp.rng.integers(0, 5, size=(6, 4)), jnp.int32)
    ref, out, plain, params = _vectors_both_ways(nnx.merge(mlp.graph, mlp.params, mlp.rest), xs, ys)
    assert out["hidden"][0]["kernel"].shape == (6, 16) and out["head"]["bias"].shape == (6, 5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), out, ref)
    # And both equal the core function applied batch by batch.
    third = jax.jit(rgo_jax.curvature_vectors, static_argnums=0)(plain, params, xs[3], ys[3])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[3], b[0], rtol=1e-5), out, third)
    # Chunks of batches (4 + 2: the last chunk shorter) give the same vectors, bit for bit.
    chunked = rgo_jax.curvature_vectors(plain, params, xs, ys, chunk=4)
    whole = rgo_jax.curvature_vectors(plain, params, xs, ys)
    jax.tree.map(np.testing.assert_array_equal, chunked, whole)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), chunked, ref)


def _linear_logits(p, x):
    return x @ p["w"] + p["b"][None]


@pytest.mark.parametrize(
    "kw", [{}, {"per_sample": True, "hessian": "full"}, {"hessian": "sampled"}]
)
def test_uneven_chunks_run_one_program_and_give_the_whole_vectors(kw):
    """7 batches in chunks of 3 (3 + 3 + 1): the last chunk is padded to 3 batches, so one
    program is compiled, and its padding's vectors are dropped (the vectors, in order, are
    those of one call over all batches)."""
    from rgo_jax import _curvature

    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(5, 4)), jnp.float32), "b": jnp.zeros(4)}
    xs = jnp.asarray(rng.normal(size=(7, 2, 5)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 4, size=(7, 2)), jnp.int32)
    if kw.get("hessian") == "sampled":
        kw = {**kw, "rng": jax.random.key(1)}
    whole = rgo_jax.curvature_vectors(_linear_logits, params, xs, ys, **kw)
    before = _curvature._batched_jit._cache_size()
    chunked = rgo_jax.curvature_vectors(_linear_logits, params, xs, ys, chunk=3, **kw)
    assert _curvature._batched_jit._cache_size() == before + 1
    # vectors per batch: one, or one per sample (2) and class (4) for per-sample "full"
    per_batch = 8 if "per_sample" in kw else 1
    assert chunked["w"].shape == whole["w"].shape == (7 * per_batch, 5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), chunked, whole
    )
    # a chunk larger than the batches is one call over them (nothing padded)
    big = rgo_jax.curvature_vectors(_linear_logits, params, xs, ys, chunk=50, **kw)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), big, whole)


@pytest.mark.slow
def test_reduced_kernel_gradients_give_the_same_vectors_conv():
    rng = np.random.default_rng(7)
    xs = jnp.asarray(rng.normal(size=(3, 4, 7, 7, 3)), jnp.float32)
    ys = jnp.asarray(rng.integers(0, 5, size=(3, 4)), jnp.int32)
    ref, out, _, _ = _vectors_both_ways(_ConvNet(nnx.Rngs(0)), xs, ys, per_sample=True)
    assert out["c1"]["kernel"].shape == (12, 27)  # 3 batches x 4 samples, 3*3*3 inputs
    assert out["c2"]["kernel"].shape == (12, 16)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), out, ref)


@pytest.mark.slow
def test_batched_curvature_vectors_errors(mlp):
    xs = jnp.zeros((6, 4, 16), jnp.float32)
    ys = jnp.zeros((6, 4), jnp.int32)
    fn = lambda p, x: nnx.merge(mlp.graph, p, mlp.rest)(x, 1)  # noqa: E731
    with pytest.raises(ValueError, match="chunk must be a positive int"):
        rgo_jax.curvature_vectors(fn, mlp.params, xs, ys, chunk=0)
    with pytest.raises(ValueError, match="same \\[num_batches, B\\] axes"):
        rgo_jax.curvature_vectors(fn, mlp.params, xs, ys[:, :3])
    model = nnx.merge(mlp.graph, mlp.params, mlp.rest)
    with pytest.raises(ValueError, match=r"kernel path\(s\) \['nope/kernel'\]"):
        with use_reduced_kernel_gradients(model, ["nope/kernel"]):
            pass


# ---------------------------------------------------------------- core changes made for speed


def test_rgo_state_from_init_can_be_donated():
    """count and skipped are distinct buffers, so a jitted step may donate the whole state."""
    tx = rgo_jax.rgo(0.1)
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    state = tx.init(params)

    def step(params, state):
        u, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
        return optax.apply_updates(params, u), state

    params, state = jax.jit(step, donate_argnums=(0, 1))(params, state)
    np.testing.assert_allclose(params["w"], 0.9 * np.ones((3, 2)), rtol=1e-6)
    assert int(state[0].num_vectors) == 0 and int(state[0].skipped) == 0


def test_block_kernel_many_blocks_matches_closed_form_and_stays_symmetric():
    """The Gram-form Woodbury block (symmetrised once at the end) over 20 blocks."""
    rng = np.random.default_rng(11)
    d, n = 40, 640
    basis = rng.normal(size=(12, d))
    v = (np.abs(rng.normal(size=(n, 12))) @ basis / np.sqrt(d)).astype(np.float32)
    p0 = jnp.eye(d, dtype=jnp.float32)[None]
    out, skipped = rgo_jax.rls_block(p0, jnp.asarray(v)[:, None], 0.01, block_size=32)
    ref = 0.01 * np.linalg.inv(0.01 * np.eye(d) + v.astype(np.float64).T @ v)
    p = np.asarray(out[0], np.float64)
    assert int(skipped[0]) == 0
    np.testing.assert_array_equal(p, p.T)
    np.testing.assert_allclose(p, ref, atol=2e-4 * np.abs(ref).max())
    seq, _ = rgo_jax.rls_sequential(p0, jnp.asarray(v)[:, None], 0.01)
    np.testing.assert_allclose(p, np.asarray(seq[0]), atol=2e-4 * np.abs(ref).max())


@pytest.mark.parametrize("b", [5, 37, 100])  # base case, odd splits, two levels of blocking
def test_blocked_cholesky_inverse_matches_float64(b):
    from rgo_jax import _rls

    rng = np.random.default_rng(b)
    a = rng.normal(size=(b, b))
    m = a @ a.T / b + 0.05 * np.eye(b)
    linv = np.asarray(jax.jit(_rls._chol_inv)(jnp.asarray(m, jnp.float32)), np.float64)
    ref = np.linalg.inv(np.linalg.cholesky(m))
    assert np.all(np.triu(linv, 1) == 0)
    np.testing.assert_allclose(linv, ref, atol=2e-3 * np.abs(ref).max())
    np.testing.assert_allclose(linv @ m @ linv.T, np.eye(b), atol=2e-3)


@pytest.mark.slow
def test_large_block_size_matches_closed_form():
    rng = np.random.default_rng(12)
    d, n = 30, 300
    v = (rng.normal(size=(n, d)) / np.sqrt(d)).astype(np.float32)
    out, _ = rgo_jax.rls_block(jnp.eye(d)[None], jnp.asarray(v)[:, None], 0.1, block_size=150)
    ref = 0.1 * np.linalg.inv(0.1 * np.eye(d) + v.astype(np.float64).T @ v)
    np.testing.assert_allclose(out[0], ref, atol=1e-4 * np.abs(ref).max())


def test_trace_normalisation_uses_the_diagonal_only_for_stacked_p():
    """The O(d) diagonal trace equals d / tr(P) per stacked matrix (float64 reference)."""
    rng = np.random.default_rng(5)
    ps = np.stack([_spd(rng, 4), _spd(rng, 4, alpha=2.0)])  # two stacked layers
    g = rng.normal(size=(2, 4, 3))
    tx = rgo_jax.scale_by_rgo({"w": rgo_jax.layouts.stacked(rgo_jax.layouts.DENSE)})
    state = tx.init({"w": jnp.zeros((2, 4, 3))})._replace(p={"w": jnp.asarray(ps, jnp.float32)})
    out, _ = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
    for i in range(2):
        expected = 4 / np.trace(ps[i]) * ps[i] @ g[i]
        np.testing.assert_allclose(out["w"][i], expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("b", [1, 7, 32])
def test_small_cholesky_inverse_matches_float64(b):
    """The one-loop factor-and-invert of the base blocks: L^-1 of the float64 Cholesky."""
    from rgo_jax import _rls

    assert b <= _rls._BASE
    rng = np.random.default_rng(b)
    a = rng.normal(size=(b, b))
    m = a @ a.T / b + 0.05 * np.eye(b)
    inv = np.asarray(jax.jit(_rls._chol_inv_small)(jnp.asarray(m, jnp.float32)), np.float64)
    ref = np.linalg.inv(np.linalg.cholesky(m))
    np.testing.assert_allclose(inv, ref, atol=2e-4 * np.abs(ref).max())
    np.testing.assert_allclose(inv @ m @ inv.T, np.eye(b), atol=1e-4)
    assert np.all(np.triu(inv, 1) == 0)


def test_block_rls_calls_no_lapack_kernel():
    """Batched LAPACK calls split their batch over XLA:CPU's thread pool and can deadlock
    when two run at once (two size buckets of one consolidation on 2 cores); the block
    kernel must be plain array ops."""
    from rgo_jax import _rls

    p = jnp.stack([jnp.eye(8)] * 3)
    v = jnp.ones((130, 3, 8))
    hlo = _rls.run_rls.lower(p, v, jnp.float32(0.1), method="block").as_text()
    assert "custom_call" not in hlo, "block RLS lowers to a custom call (LAPACK?)"
