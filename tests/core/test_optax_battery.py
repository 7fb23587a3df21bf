"""One optax battery, run over every gradient transformation the package offers.

Each case builds a transformation, brings its state past the trivial initial one (a
consolidation, an OWM step, GPM bases) and gives the extra arguments its update needs.
The properties are optax's common ones: extra arguments accepted, no recompilation on the
second jitted call, ``tree_map_params``, state shapes and dtypes stable under ``lax.cond``,
and the transformation inside ``inject_hyperparams``, ``chain``, ``partition``, ``masked``.

chex is used for the tree comparisons (``assert_trees_all_close``/``_equal``), the state
shape/dtype checks (``assert_trees_all_equal_shapes_and_dtypes``, ``assert_shape``) and the
trace count (``assert_max_traces``). ``chex.variants`` needs ``chex.TestCase`` (absl
parameterized); these are plain pytest functions, so "with and without jit" is a
``pytest.mark.parametrize`` over ``jax.jit`` and the identity instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import rgo_jax
from rgo_jax import baselines

PARAMS = {"fc": {"kernel": jnp.ones((4, 3)), "bias": jnp.ones(3)}, "c": jnp.ones((2, 2, 1, 2))}
# fc/kernel and c are projected by every method; fc/bias by RGO (and OWM with biases).
LABELS = {"fc": {"kernel": "t", "bias": "t"}, "c": "f"}
MASK = {"fc": {"kernel": True, "bias": True}, "c": False}


def _grads(scale=1.0):
    return jax.tree.map(
        lambda p: scale * (1.0 + jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape)), PARAMS
    )


def _rgo_vectors(n=3):
    rng = np.random.default_rng(0)
    return {
        "fc": {"kernel": rng.normal(size=(n, 4)), "bias": rng.normal(size=(n, 3))},
        "c": rng.normal(size=(n, 4)),
    }


def _consolidate(state):
    vecs = jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), _rgo_vectors())
    return rgo_jax.consolidate(state, vecs, 0.1)


def _owm_step(state):
    inputs = {"fc/kernel": np.eye(4)[:2] + 0.5, "c": np.ones((3, 4)), "fc/bias": None}
    return baselines.owm_update(state, inputs, 1.0)


def _gpm_bases(state):
    reps = {"fc/kernel": np.eye(4)[:2], "c": np.eye(4)[1:2]}
    return baselines.gpm_update_bases(state, reps, 0.99)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    factory: Callable[..., optax.GradientTransformation]
    kwargs: dict
    prepare: Callable[[Any], Any]  # any optimizer state holding the method's state -> advanced
    extra: dict  # extra arguments of update

    def make(self):
        return self.factory(**self.kwargs)


_REF = jax.tree.map(lambda p: -jnp.ones_like(p), PARAMS)

CASES = [
    Case("scale_by_rgo", rgo_jax.scale_by_rgo, {}, _consolidate, {}),
    Case("rgo", rgo_jax.rgo, {"learning_rate": 0.1}, _consolidate, {}),
    Case(
        "rgo_input_projected",
        rgo_jax.scale_by_rgo,
        {"input_projected": r"fc/kernel$"},
        _consolidate,
        {},
    ),
    Case("scale_by_owm", baselines.scale_by_owm, {"project_biases": True}, _owm_step, {}),
    Case("scale_by_gpm", baselines.scale_by_gpm, {}, _gpm_bases, {}),
    Case("agem", baselines.agem, {}, lambda s: s, {"ref_grads": _REF}),
]
IDS = [c.name for c in CASES]


def _prepared(case, tx=None, params=PARAMS):
    tx = case.make() if tx is None else tx
    return tx, case.prepare(tx.init(params))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.slow
def test_extra_args_are_accepted_and_ignored(case):
    tx, state = _prepared(case)
    out, _ = tx.update(_grads(), state, PARAMS, **case.extra)
    out2, _ = tx.update(_grads(), state, PARAMS, unknown_arg=3, loss=jnp.ones(()), **case.extra)
    chex.assert_trees_all_equal(out, out2)
    chex.assert_trees_all_equal_structs(out, PARAMS)
    assert not jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.all(a == b)), out, _grads()))


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.slow
def test_no_recompilation_on_second_call(case):
    tx, state = _prepared(case)
    chex.clear_trace_counter()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(g, s):
        return tx.update(g, s, PARAMS, **case.extra)

    out1, s1 = step(_grads(), state)
    out2, _ = step(_grads(2.0), s1)
    # Every method is linear in a positive scale of the gradient (A-GEM's test is on a sign).
    chex.assert_trees_all_close(out2, jax.tree.map(lambda u: 2 * u, out1), rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tree_map_params_keeps_the_state(case):
    tx, state = _prepared(case)
    mapped = optax.tree_map_params(tx, lambda p: p, state)
    chex.assert_trees_all_equal_shapes_and_dtypes(mapped, state)
    chex.assert_trees_all_equal(mapped, state)


@pytest.mark.parametrize("jit", [jax.jit, lambda f: f], ids=["jit", "nojit"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_is_stable_under_lax_cond(case, jit):
    tx, state = _prepared(case)

    def maybe_step(pred, s):
        return jax.lax.cond(
            pred, lambda s: tx.update(_grads(), s, PARAMS, **case.extra)[1], lambda s: s, s
        )

    for pred in (True, False):
        out = jit(maybe_step)(pred, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, state)
        chex.assert_trees_all_equal_shapes_and_dtypes(out, tx.init(PARAMS))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inside_inject_hyperparams(case):
    tx, state = _prepared(case)
    injected = optax.inject_hyperparams(case.factory)(**case.kwargs)
    istate = case.prepare(injected.init(PARAMS))
    ref, _ = tx.update(_grads(), state, PARAMS, **case.extra)
    out, _ = jax.jit(lambda g, s: injected.update(g, s, PARAMS, **case.extra))(_grads(), istate)
    chex.assert_trees_all_close(out, ref, rtol=1e-6)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_inside_chain(case):
    tx, state = _prepared(case)
    chained = optax.chain(optax.clip_by_global_norm(1e6), case.make(), optax.scale(-0.5))
    cstate = case.prepare(chained.init(PARAMS))
    ref, _ = tx.update(_grads(), state, PARAMS, **case.extra)
    out, _ = jax.jit(lambda g, s: chained.update(g, s, PARAMS, **case.extra))(_grads(), cstate)
    chex.assert_trees_all_close(out, jax.tree.map(lambda u: -0.5 * u, ref), rtol=1e-6)


def _sub(tree):
    return {"fc": tree["fc"]}


@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.slow
def test_inside_partition_and_masked(case):
    # The reference: the transformation on the "t" leaves alone.
    tx, sub_state = _prepared(case, params=_sub(PARAMS))
    extra = {k: _sub(v) for k, v in case.extra.items()}
    ref, _ = tx.update(_sub(_grads()), sub_state, _sub(PARAMS), **extra)

    part = optax.partition({"t": case.make(), "f": optax.scale(-1.0)}, LABELS)
    pstate = case.prepare(part.init(PARAMS))
    out, _ = jax.jit(lambda g, s: part.update(g, s, PARAMS, **case.extra))(_grads(), pstate)
    chex.assert_trees_all_close(out["fc"], ref["fc"], rtol=1e-5)
    chex.assert_trees_all_equal(out["c"], -_grads()["c"])

    masked = optax.masked(case.make(), MASK)
    mstate = case.prepare(masked.init(PARAMS))
    out, _ = jax.jit(lambda g, s: masked.update(g, s, PARAMS, **case.extra))(_grads(), mstate)
    chex.assert_trees_all_close(out["fc"], ref["fc"], rtol=1e-5)
    chex.assert_trees_all_equal(out["c"], _grads()["c"])


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_rgo_state_shapes(case):
    _, state = _prepared(case)
    (rstate,) = rgo_jax.rgo_states(state)
    leaves = jax.tree.leaves(rstate.p)
    chex.assert_shape(leaves, [(4, 4), (3, 3), (4, 4)])  # c, fc/bias, fc/kernel
    chex.assert_rank(rstate.num_vectors, 0)
