"""Every method's train step next to SGD's: RGO, OWM, GPM, EWC, A-GEM (paper MLP, batch 10).

Each case is one jitted step (forward, backward, the method's per-step work, the SGD
update) on the paper's MLP 784-256-256-10 with synthetic MNIST-shaped data, built from the
library's public transformations the way the harness wires them
(``rgo_jax.bench._methods``): OWM absorbs the step's batch-mean layer inputs (one extra
forward pass for them) and then projects (``owm_input``: the dense kernels on the input
side, as ``--input-projection`` runs it); GPM projects with bases of a given rank; EWC adds
its penalty to the loss; A-GEM takes a reference gradient on a memory batch of 64. Cases
run side by side in interleaved rounds (``_common.time_cases``), params and optimizer state
donated. Besides the median, each row gives XLA's FLOP count of the step and the FLOPs its
per-step work needs analytically, the reason a step cannot be close to SGD's.

GPM is timed at four basis ranks ``k`` per layer (0: the first task; d/4; 3d/4; d: every
direction protected) with the library's projection, which reads in blocks only the basis
columns it needs: ``G - M (M^T G)`` up to rank d/2, ``N (N^T G)`` with ``N`` the stored
orthonormal complement past it (``4 d min(k, d - k) m`` FLOPs; nothing at rank 0 or d).
Beside them: rank 3d/4 with a zero-padded basis (an earlier version's state, projected by
``M``: the previous form, ``4 d k m``), the dense-basis form ``G - M (M^T G)`` over all
``d`` columns at full rank (``4 d^2 m``) and a precomputed projector ``G - Q G`` (``Q = M
M^T``, ``2 d^2 m``, not what the library stores; the complement form needs fewer FLOPs at
every rank).

Command and cost (2-core CPU): ``python benchmarks/perf/bench_methods.py`` (about 2-3
minutes, most of it compilation); ``--budget`` sets the timed seconds.
"""

from __future__ import annotations

import argparse

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rgo_jax
from rgo_jax import baselines
from rgo_jax.bench import _methods
from rgo_jax.bench._methods import AGEMOptions, EWCOptions, OWMOptions
from rgo_jax.bench.models import build_model, param_path_str
from rgo_jax.nnx import use_input_projection

LR = 0.1


def _problem(batch: int, hidden: tuple[int, ...], seed: int = 0):
    model = build_model(
        "mlp", num_classes=10, input_shape=(28, 28, 1), hidden=hidden, seed=seed, fel=False
    )
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.as_pure(params)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, 28, 28, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)

    def logits(params, x, opt_state=None):
        model = nnx.merge(graph, params, rest)
        if opt_state is None:
            return model(x, 0)
        with use_input_projection(model, opt_state):
            return model(x, 0)

    def inputs(params, x):
        return nnx.merge(graph, params, rest)(x, 0, return_inputs=True)[1]

    def ce(params, x, y, opt_state=None):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits(params, x, opt_state), y
        ).mean()

    return params, x, y, ce, inputs, rng


def _step(tx, loss, kwargs_fn=None, input_projected=False):
    def step(params, state, x, y):
        g = jax.grad(loss)(params, x, y, state if input_projected else None)
        kwargs = {} if kwargs_fn is None else kwargs_fn(params, x)
        u, state = tx.update(g, state, params, **kwargs)
        return optax.apply_updates(params, u), state

    return step


def _gpm_state(state, rank_fraction: float, rng, complement: bool = True):
    """The GPM state with random orthonormal bases of ``rank_fraction * d`` columns, the
    columns past the rank as ``gpm_update_bases`` stores them (past rank d/2 the
    orthonormal complement, zero before) or, with ``complement=False``, zero (an earlier
    version's state)."""
    gpm = state[0]

    def fill(m, r):
        if m.shape == (0, 0):
            return m, r
        d = m.shape[-1]
        k = int(round(rank_fraction * d))
        q = np.linalg.qr(rng.normal(size=(d, d)))[0]
        if not complement or 2 * k <= d:
            q[:, k:] = 0.0
        return jnp.asarray(q, m.dtype), jnp.full(r.shape, k, jnp.int32)

    pairs = jax.tree.map(fill, gpm.bases, gpm.rank)
    is_pair = lambda t: isinstance(t, tuple)  # noqa: E731
    bases = jax.tree.map(lambda t: t[0], pairs, is_leaf=is_pair)
    ranks = jax.tree.map(lambda t: t[1], pairs, is_leaf=is_pair)
    return (gpm._replace(bases=bases, rank=ranks), *state[1:])


def _dense_gpm_step(loss, form: str):
    """GPM's step with the previous dense forms of the projection (for comparison)."""

    def step(params, mats, x, y):
        g = jax.grad(loss)(params, x, y)

        def one(g, m):
            if m.shape == (0, 0):
                return g
            gm = g.reshape(m.shape[-1], -1)
            if form == "basis":  # G - M (M^T G) over every padded column
                out = gm - m @ (m.T @ gm)
            else:  # m holds the projector Q = M M^T
                out = gm - m @ gm
            return out.reshape(g.shape)

        u = jax.tree.map(one, g, mats)
        return (jax.tree.map(lambda w, u: w - LR * u, params, u),)

    return step


def _analytic(params, hidden) -> dict[str, float]:
    """Per-step FLOPs: forward+backward (~6 per weight per example) and each projection."""
    kernels = [p for p in jax.tree.leaves(params) if p.ndim == 2]
    fb = 6.0 * sum(k.size for k in kernels)
    pg = sum(2.0 * k.shape[0] ** 2 * k.shape[1] for k in kernels)  # P @ G per kernel
    return {"fwd_bwd_per_example": fb, "pg": pg}


def bench(batch: int, hidden: tuple[int, ...], rounds: int, budget: float) -> dict:
    params, x, y, ce, inputs, rng = _problem(batch, hidden)
    own = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - each case donates its own
    o = {
        "owm_alpha": OWMOptions().alpha,
        "ewc_lambda": EWCOptions().lambda_,
        "agem_per_task": AGEMOptions().per_task,
        "agem_batch": AGEMOptions().batch,
    }
    cases = {}
    sgd = optax.sgd(LR)
    cases["sgd"] = (_step(sgd, ce), (own(params), sgd.init(params), x, y), (0, 1))
    rgo = rgo_jax.rgo(LR)
    cases["rgo"] = (_step(rgo, ce), (own(params), rgo.init(params), x, y), (0, 1))
    rgo_in = rgo_jax.rgo(LR, input_projected=r"kernel$")
    cases["rgo_input"] = (
        _step(rgo_in, ce, input_projected=True),
        (own(params), rgo_in.init(params), x, y),
        (0, 1),
    )
    owm = optax.chain(baselines.scale_by_owm(project_biases=True), optax.sgd(LR))

    def owm_kwargs(p, xb):
        return {"owm_inputs": inputs(p, xb), "owm_alpha": o["owm_alpha"]}

    cases["owm"] = (_step(owm, ce, owm_kwargs), (own(params), owm.init(params), x, y), (0, 1))
    cases["owm_project_only"] = (_step(owm, ce), (own(params), owm.init(params), x, y), (0, 1))
    owm_in = optax.chain(
        baselines.scale_by_owm(project_biases=True, input_projected=r"kernel$"), optax.sgd(LR)
    )

    def owm_input_step(params, state, x, y):  # P absorbs first, then the layers project
        state = baselines.owm_update(state, inputs(params, x), o["owm_alpha"])
        u, state = owm_in.update(jax.grad(ce)(params, x, y, state), state, params)
        return optax.apply_updates(params, u), state

    cases["owm_input"] = (owm_input_step, (own(params), owm_in.init(params), x, y), (0, 1))
    gpm = optax.chain(baselines.scale_by_gpm(project_biases=True), optax.sgd(LR))
    for frac, tag in ((0.0, "0"), (0.25, "d/4"), (0.75, "3d/4"), (1.0, "d")):
        st = _gpm_state(gpm.init(params), frac, np.random.default_rng(1))
        cases[f"gpm_rank_{tag}"] = (_step(gpm, ce), (own(params), st, x, y), (0, 1))
        if frac == 0.75:
            padded = _gpm_state(gpm.init(params), frac, np.random.default_rng(1), False)
            cases["gpm_rank_3d/4_m_side"] = (_step(gpm, ce), (own(params), padded, x, y), (0, 1))
        if frac == 1.0:
            m = own(st[0].bases)
            q = jax.tree.map(lambda b: b if b.shape == (0, 0) else b @ b.T, m)
            cases["gpm_rank_d_dense_basis"] = (
                _dense_gpm_step(ce, "basis"),
                (own(params), m, x, y),
                (0,),
            )
            cases["gpm_rank_d_projector"] = (
                _dense_gpm_step(ce, "projector"),
                (own(params), q, x, y),
                (0,),
            )
    # The harness's input-side GPM (``--input-projection``): through the batch inputs' span.
    gpm_in = optax.chain(_methods._scale_by_gpm_input_side(), optax.sgd(LR))

    def gpm_kwargs(p, xb):
        return {"gpm_inputs": {param_path_str(k): v for k, v in inputs(p, xb).items()}}

    for frac, tag in ((0.25, "d/4"), (0.75, "3d/4")):
        st = _gpm_state(gpm_in.init(params), frac, np.random.default_rng(1))
        step = _step(gpm_in, ce, gpm_kwargs)
        cases[f"gpm_input_rank_{tag}"] = (step, (own(params), st, x, y), (0, 1))
    zeros = jax.tree.map(jnp.zeros_like, params)
    fisher = jax.tree.map(lambda p: jnp.abs(p) + 0.1, params)
    ewc_state = baselines.ewc_accumulate(None, params, fisher)
    ewc_state = baselines.ewc_accumulate(ewc_state, jax.tree.map(lambda p: p * 0.9, params), zeros)

    def ewc_loss(params, x, y, opt_state=None):
        return ce(params, x, y) + ewc_state.penalty(params, o["ewc_lambda"])

    cases["ewc"] = (_step(sgd, ewc_loss), (own(params), sgd.init(params), x, y), (0, 1))
    mem_x = jnp.asarray(rng.normal(size=(o["agem_per_task"] * 4, 28, 28, 1)), jnp.float32)
    mem_y = jnp.asarray(rng.integers(0, 10, size=len(mem_x)), jnp.int32)
    agem = optax.chain(baselines.agem(), optax.sgd(LR))

    def agem_kwargs(p, xb):
        idx = jax.random.randint(jax.random.key(0), (o["agem_batch"],), 0, len(mem_x))
        return {"ref_grads": jax.grad(ce)(p, mem_x[idx], mem_y[idx])}

    cases["agem"] = (_step(agem, ce, agem_kwargs), (own(params), agem.init(params), x, y), (0, 1))
    res = C.time_cases(cases, rounds=rounds, max_total_s=budget)
    base = res["sgd"]["median_s"]
    for r in res.values():
        r["over_sgd"] = r["median_s"] / base
        r["over_sgd_min"] = r["min_s"] / res["sgd"]["min_s"]
    return {"batch": batch, "hidden": list(hidden), "analytic": _analytic(params, hidden), **res}


WHY = {
    "sgd": "",
    "rgo": "P @ G on every kernel: 2 d^2 m FLOPs",
    "rgo_input": "(P X^T) D: 2 B d^2 + 2 B d m",
    "owm": "P @ G (2 d^2 m) + RLS on P (~4 d^2) + a forward pass for the inputs",
    "owm_project_only": "P @ G only",
    "owm_input": "RLS on P (~4 d^2), then (P X^T) D: 2 B d^2 + 2 B d m; at 784-256-256-10, "
    "batch 10, ~18 MFLOP more than SGD's step (2 B d^2 of the 784-wide layer alone, 12.3 "
    "MFLOP, is SGD's whole step): >= 2.4x SGD by its FLOPs",
    "gpm_rank_0": "first task: nothing to project",
    "gpm_rank_d/4": "G - M (M^T G): 4 d k m, k = d/4",
    "gpm_rank_3d/4": "N (N^T G), N the complement: 4 d (d - k) m, k = 3d/4",
    "gpm_rank_3d/4_m_side": "zero-padded basis (previous form): G - M (M^T G), 4 d k m",
    "gpm_rank_d": "nothing: the projected gradient is zero",
    "gpm_rank_d_dense_basis": "dense basis: 4 d^2 m at every rank",
    "gpm_rank_d_projector": "precomputed Q = M M^T: 2 d^2 m (not stored by the library)",
    "gpm_input_rank_d/4": "input side (the harness's --input-projection): "
    "(Q - M (M^T Q)) (Q^T G), Q [d, B] from a QR of the batch inputs: 4 d k B",
    "gpm_input_rank_3d/4": "input side, the complement: N (N^T Q) (Q^T G): 4 d (d - k) B",
    "ewc": "penalty: ~4 FLOPs per parameter",
    "agem": "a second backward pass on 64 memory examples",
}


def markdown(r: dict) -> str:
    a = r["analytic"]
    fb = a["fwd_bwd_per_example"] * r["batch"]
    rows = []
    for k, c in r.items():
        if not isinstance(c, dict) or "median_s" not in c:
            continue
        rows.append(
            [
                k,
                f"{C.fmt_s(c['median_s'])} ({C.fmt_s(c['min_s'])})",
                f"{c['over_sgd']:.2f}",
                f"{c['over_sgd_min']:.2f}",
                f"{(c['xla_flops'] or 0) / 1e6:.1f}",
                WHY.get(k, ""),
                f"{c['compile_s']:.2f} s",
            ]
        )
    return "\n".join(
        [
            f"MLP 784-{'-'.join(map(str, r['hidden']))}-10, batch {r['batch']}. Median of "
            "interleaved samples (min in brackets); `over_sgd`: ratio to SGD's step (of the "
            "medians, of the minima: the minima are the least disturbed by other load). XLA "
            "counts a loop body once (GPM's blocked projection). "
            f"Analytic: forward+backward {fb / 1e6:.1f} MFLOP a step; P @ G over all kernels "
            f"{a['pg'] / 1e6:.1f} MFLOP ({a['pg'] / fb:.0f}x the forward+backward).",
            "",
            C.md_table(
                ["method", "step", "over_sgd", "over_sgd (min)", "XLA MFLOP", "per-step work"]
                + ["compile"],
                rows,
            ),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--hidden", default="256,256")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=60.0, help="timed seconds in all")
    ap.add_argument("--out", default="methods_step")
    args = ap.parse_args()
    prov = C.provenance()
    hidden = tuple(int(h) for h in args.hidden.split(","))
    r = bench(args.batch, hidden, args.rounds, args.budget)
    for k, c in r.items():
        if isinstance(c, dict) and "median_s" in c:
            print(f"  {k:24s} {C.fmt_s(c['median_s']):>10s}  x{c['over_sgd']:.2f} sgd", flush=True)
    path = C.write_results(args.out, prov, {"result": r}, markdown(r))
    print(f"[bench_methods] wrote {path}")


if __name__ == "__main__":
    main()
