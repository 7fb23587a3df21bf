"""A-GEM baseline: the projection over the whole tree, and the episodic memory."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from rgo_jax.baselines import AGEMState, EpisodicMemory, agem, agem_project


def _tree(rng, scale=1.0):
    return {
        "a": {"kernel": jnp.asarray(scale * rng.normal(size=(4, 3)), jnp.float32)},
        "b": jnp.asarray(scale * rng.normal(size=(5,)), jnp.float32),
    }


def _flat(t) -> np.ndarray:
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(t)])


def _conflicting(rng):
    """A pair with <g, g_ref> < 0 over the whole tree (but not leaf by leaf)."""
    g, ref = _tree(rng), _tree(rng)
    ref = jax.tree.map(lambda x, y: y - 2.0 * x, g, ref)
    assert _flat(g) @ _flat(ref) < 0
    return g, ref


def test_conflicting_gradient_is_projected_onto_the_constraint():
    rng = np.random.default_rng(0)
    g, ref = _conflicting(rng)
    out, violated = agem_project(g, ref)
    assert bool(violated)
    fg, fr, fo = _flat(g), _flat(ref), _flat(out)
    assert abs(fo @ fr) < 1e-5 * np.linalg.norm(fg) * np.linalg.norm(fr)
    np.testing.assert_allclose(fo, fg - (fg @ fr) / (fr @ fr) * fr, rtol=1e-5, atol=1e-6)


def test_agreeing_gradient_is_unchanged():
    rng = np.random.default_rng(1)
    g = _tree(rng)
    ref = jax.tree.map(lambda x, y: x + 0.1 * y, g, _tree(rng))
    assert _flat(g) @ _flat(ref) >= 0
    out, violated = agem_project(g, ref)
    assert not bool(violated)
    jax.tree.map(np.testing.assert_array_equal, out, g)
    zero = jax.tree.map(jnp.zeros_like, g)  # a zero reference never projects
    out, violated = agem_project(g, zero)
    assert not bool(violated)
    jax.tree.map(np.testing.assert_array_equal, out, g)


def test_transformation_in_jitted_chain_compiles_once():
    rng = np.random.default_rng(2)
    tx = optax.chain(agem(), optax.sgd(0.5))
    g, ref = _conflicting(rng)
    state = tx.init(g)
    traces = []

    @jax.jit
    def step(g, state, ref):
        traces.append(1)
        return tx.update(g, state, ref_grads=ref)

    upd, state = step(g, state, ref)
    want, _ = agem_project(g, ref)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, -0.5 * w, rtol=1e-6), upd, want)
    upd, state = step(ref, state, ref)  # agrees with itself: unchanged
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, -0.5 * w, rtol=1e-6), upd, ref)
    assert len(traces) == 1
    assert isinstance(state[0], AGEMState)
    assert int(state[0].count) == 2 and int(state[0].num_projected) == 1
    # No reference gradient (first task): plain pass-through.
    upd, _ = tx.update(g, state)
    jax.tree.map(lambda u, w: np.testing.assert_allclose(u, -0.5 * w), upd, g)


def test_mismatched_reference_names_the_leaf():
    rng = np.random.default_rng(3)
    g = _tree(rng)
    with pytest.raises(ValueError, match=r"missing \['b'\]"):
        agem_project(g, {"a": g["a"]})
    with pytest.raises(ValueError, match="ref_grads for 'b' have shape"):
        agem_project(g, {"a": g["a"], "b": jnp.zeros(4)})


def test_nnx_optimizer_forwards_ref_grads():
    model = nnx.Linear(2, 1, use_bias=False, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(model, optax.chain(agem(), optax.sgd(1.0)), wrt=nnx.Param)
    w0 = np.asarray(model.kernel[...])
    grads = nnx.state(model, nnx.Param)
    grads = jax.tree.map(lambda _: jnp.array([[1.0], [-1.0]]), grads)
    ref = jax.tree.map(lambda _: jnp.array([[0.0], [1.0]]), grads)
    opt.update(model, grads, ref_grads=ref)
    np.testing.assert_allclose(model.kernel[...], w0 - np.array([[1.0], [0.0]]), atol=1e-7)


def _stream(task: int, n: int):
    x = np.stack([np.full((2,), 100 * task + i, np.float32) for i in range(n)])
    return x, (np.arange(n) + 100 * task).astype(np.int64)


def test_memory_quota_and_ring_policy():
    mem = EpisodicMemory(per_task=4, policy="ring")
    for task in range(3):
        x, y = _stream(task, 10)
        mem.add(task, x[:7], y[:7])
        mem.add(task, x[7:], y[7:])
    assert len(mem) == 12 and mem.tasks == [0, 1, 2]
    for task in range(3):
        x, y = mem.task_data(task)
        assert sorted(y.tolist()) == [100 * task + i for i in range(6, 10)]  # the last 4
        np.testing.assert_array_equal(x[:, 0], y)  # x and y stay paired
        assert mem.num_seen(task) == 10


def test_reservoir_is_deterministic_and_uniform():
    def fill(seed):
        mem = EpisodicMemory(per_task=5, seed=seed)
        x, y = _stream(1, 20)
        for i in range(0, 20, 3):
            mem.add(1, x[i : i + 3], y[i : i + 3])
        return mem.task_data(1)[1]

    np.testing.assert_array_equal(fill(7), fill(7))
    assert any(set(fill(7)) != set(fill(s)) for s in range(8, 12))
    # Every example of the stream is kept with probability 5/20.
    counts = np.zeros(20)
    trials = 2000
    for seed in range(trials):
        counts[fill(seed) - 100] += 1
    freq = counts / trials
    assert np.all(np.abs(freq - 0.25) < 4 * np.sqrt(0.25 * 0.75 / trials))


def test_task_contents_do_not_depend_on_other_tasks():
    a, b = EpisodicMemory(3, seed=1), EpisodicMemory(3, seed=1)
    a.add(0, *_stream(0, 9))
    a.add(1, *_stream(1, 9))
    b.add(1, *_stream(1, 9))
    np.testing.assert_array_equal(a.task_data(1)[1], b.task_data(1)[1])


def test_sample_is_seeded_restricted_and_static_in_shape():
    mem = EpisodicMemory(per_task=4, seed=0)
    for task in range(3):
        mem.add(task, *_stream(task, 4))
    x1, y1, t1 = mem.sample(np.random.default_rng(5), 6)
    x2, y2, t2 = mem.sample(5, 6)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(t1, t2)
    assert x1.shape == (6, 2) and t1.dtype == np.int32
    assert len(set(zip(t1.tolist(), y1.tolist(), strict=True))) == 6  # without replacement
    np.testing.assert_array_equal(y1 // 100, t1)  # each example with its own task
    _, y, t = mem.sample(0, 10, tasks=[1])
    assert set(t.tolist()) == {1} and y.shape == (10,)  # with replacement (only 4 stored)
    with pytest.raises(ValueError, match="no stored examples for tasks"):
        mem.sample(0, 2, tasks=[9])


def test_memory_input_errors():
    mem = EpisodicMemory(per_task=2)
    mem.add(0, np.zeros((3, 2), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="all tasks must share one shape"):
        mem.add(1, np.zeros((3, 4), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="same n"):
        mem.add(0, np.zeros((3, 2), np.float32), np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="per_task must be a positive int"):
        EpisodicMemory(per_task=0)
    with pytest.raises(KeyError, match="task 5"):
        mem.task_data(5)


def test_memory_state_dict_resumes_exactly():
    full = EpisodicMemory(per_task=4, seed=3)
    part = EpisodicMemory(per_task=4, seed=3)
    for task in range(2):
        x, y = _stream(task, 12)
        full.add(task, x, y)
        part.add(task, x[:6], y[:6])
    resumed = EpisodicMemory.from_state_dict(part.state_dict())
    for task in range(2):
        x, y = _stream(task, 12)
        resumed.add(task, x[6:], y[6:])  # continue the stream after the checkpoint
    for task in range(2):
        np.testing.assert_array_equal(resumed.task_data(task)[1], full.task_data(task)[1])
        assert resumed.num_seen(task) == 12
    with pytest.raises(ValueError, match="malformed state"):
        EpisodicMemory.from_state_dict({"per_task": 4})
