"""update_projection called eagerly compiles in two stages: the fast kernel and its check
first, the square-root fallback only where a result fails the check. The P, counters and
dtype are bit for bit those of the one-stage update (what runs under ``jit``)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rgo_jax
from rgo_jax import _transform


def _stages(monkeypatch) -> list:
    """Records each run of the compiled update from now on: True for the first stage (the
    fast kernel and its check), False for the full update with its fallback."""
    calls = []
    original = _transform._update_projection

    def counting(*args):
        calls.append(len(args) == 7 and args[6])
        return original(*args)

    monkeypatch.setattr(_transform, "_update_projection", counting)
    return calls


def _one_stage(state, vectors, alpha, method):
    """The whole update as one program (what update_projection traces under ``jit``)."""
    return _transform._update_projection(state, vectors, jnp.float32(alpha), method, 64)


def _assert_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("method", ["block", "sequential"])
@pytest.mark.slow  # compiles the update in both forms
def test_eager_update_runs_the_fallback_only_where_a_check_fails(monkeypatch, method):
    params = {"a": {"kernel": jnp.zeros((13, 3))}, "b": jnp.zeros((7, 2))}  # two size buckets
    state = rgo_jax.scale_by_rgo().init(params)
    rng = np.random.default_rng(0)
    good = {"a": {"kernel": rng.normal(size=(40, 13))}, "b": rng.normal(size=(40, 7))}
    # alpha / |v|^2 ~ 1e-8 in one leaf: the plain float32 kernels fail (test_numerics.py).
    bad = {"a": {"kernel": rng.normal(size=(40, 13)) * 300.0}, "b": rng.normal(size=(40, 7))}
    for vectors, fails in ((good, False), (bad, True)):
        vectors = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), vectors)
        calls = _stages(monkeypatch)
        eager = rgo_jax.update_projection(state, vectors, 0.01, method=method)
        # First stage only, or (its check failed) the full update after it.
        assert calls == ([True, False] if fails else [True])
        assert int(eager.num_vectors) == 40 and int(eager.skipped) == 0
        for p in jax.tree.leaves(eager.p):
            p = np.asarray(p, np.float64)
            assert np.all(np.isfinite(p)) and np.linalg.eigvalsh(p).min() > 0
        monkeypatch.undo()
        _assert_identical(eager, _one_stage(state, vectors, 0.01, method))


def test_first_stage_leaves_a_failed_state_unchanged():
    """The first stage returns the old state (counters unmoved) when a check fails, which is
    how update_projection knows to run the second."""
    v = np.random.default_rng(1).normal(size=(40, 11)) * 300.0
    state = rgo_jax.scale_by_rgo().init({"w": jnp.zeros((11, 2))})
    state = rgo_jax.update_projection(state, {"w": jnp.ones((2, 11))}, 0.5)
    first = _transform._update_projection(
        state, {"w": jnp.asarray(v, jnp.float32)}, jnp.float32(0.01), "block", 64, False, True
    )
    _assert_identical(first, state)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the one-pass options are CPU's")
@pytest.mark.slow  # compiles the update twice, and once more under jit
def test_cpu_one_pass_program_gives_the_default_compilers_bits():
    """On CPU the block update is compiled with the classic loop emitters (less compile
    time); its P and counters are those of the default compilation, bit for bit."""
    assert _transform._update_program("block") is _transform._update_block_cpu
    assert _transform._update_program("sequential") is _transform._update_default
    rng = np.random.default_rng(2)
    state = rgo_jax.scale_by_rgo().init({"a": jnp.zeros((65, 4))})
    vectors = {"a": jnp.asarray(rng.normal(size=(150, 65)), jnp.float32)}
    # the first stage (fast kernel and its check), the program an eager update runs
    args = (state, vectors, jnp.float32(0.01), "block", 64, False, True)
    fast = _transform._update_block_cpu(*args)
    _assert_identical(fast, _transform._update_default(*args))
    assert int(fast.num_vectors) == 150
    # under an outer jit the update is part of that program: no nested compiler options
    inner = jax.jit(lambda s, v: rgo_jax.update_projection(s, v, 0.01))(state, vectors)
    assert int(inner.num_vectors) == 150
