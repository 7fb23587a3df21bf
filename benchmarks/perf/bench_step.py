"""Train-step cost of RGO next to plain SGD, the bare P @ G products and a reference matmul.

For each model (batch 10, synthetic data of the benchmark's input shape) it times, side by
side in interleaved rounds (see ``_common.py``), with compilation measured apart:

* ``sgd``: forward + backward + SGD update (the base optimizer's step);
* ``rgo``: the same with ``rgo_jax.rgo`` (trace-normalised ``P @ G`` on every leaf);
* ``rgo_nodonate``: ``rgo`` jitted without donating params and optimizer state: the
  unchanged P is then copied to a fresh output buffer on every call;
* ``rgo_input``: input-side projection of the dense kernels (``(P X^T) D`` inside the
  backward pass, ``rgo_jax._input_projection``), the rest as ``rgo``;
* ``rgo_bf16``: ``rgo`` with P stored in bfloat16;
* ``pg``: only the ``P @ G`` matrix products the RGO step must do (same shapes, one jit);
* on the MLP also variants of the trace normalisation: ``jnp.trace`` (reads all of P),
  the diagonal (``O(d)``), and a scale precomputed outside the step.

Step functions donate their params and optimizer state (``donate_argnums=(0, 1)``) and
are fed their own outputs, as in a training loop. FLOP counts are XLA's ``cost_analysis``
of each compiled function.

Command and cost (2-core CPU): ``python benchmarks/perf/bench_step.py`` (MLP, AlexNet,
reduced ResNet-18; about 3-5 minutes, most of it AlexNet's 2048 x 2048 P products).
``--models resnet18`` adds the paper's ResNet-18 (width 64; slow on a CPU).
"""

from __future__ import annotations

import argparse
import math
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import rgo_jax
from rgo_jax import _layout
from rgo_jax.bench.models import build_model
from rgo_jax.nnx import use_input_projection

MODELS = {
    # name: (input shape, classes, dense-kernel regex for the input-side projection)
    "mlp": ((28, 28, 1), 10, r"kernel$"),
    "alexnet": ((32, 32, 3), 100, r"^(fc1|fc2|head)/kernel$"),
    "reduced_resnet18": ((32, 32, 3), 100, r"^head/kernel$"),
    "resnet18": ((32, 32, 3), 100, r"^head/kernel$"),
}


def _problem(name: str, batch: int, seed: int = 0):
    shape, classes, dense_rx = MODELS[name]
    model = build_model(name, num_classes=classes, input_shape=shape, seed=seed)
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32)
    y = jnp.asarray(rng.integers(0, classes, size=batch), jnp.int32)

    def loss(params, x, y, opt_state=None):
        model = nnx.merge(graph, params, rest)
        if opt_state is None:
            logits = model(x, 1)
        else:
            with use_input_projection(model, opt_state):
                logits = model(x, 1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    return params, x, y, loss, dense_rx


def _step(tx, loss, input_projected=False):
    def step(params, state, x, y):
        g = jax.grad(loss)(params, x, y, state if input_projected else None)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    return step


def _variant_step(loss, kind: str, lr: float = 0.1):
    """RGO step with a chosen trace normalisation (for the 'does the trace matter' question)."""

    def project(g, p, scale):
        info = _layout.resolve_layouts(g)

        def one(path, g, p, s):
            lay, shape = info[_layout.path_str(path)]
            d = p.shape[-1]
            if kind == "trace_full":
                s = d / jnp.trace(p)
            elif kind == "trace_diag":
                s = d / jnp.sum(jnp.diagonal(p))
            return lay.from_matrix(jnp.matmul(p, lay.to_matrix(g)) * s, shape)

        return jax.tree_util.tree_map_with_path(one, g, p, scale)

    def step(params, p, scale, x, y):
        g = jax.grad(loss)(params, x, y)
        u = project(g, p, scale)
        return (jax.tree.map(lambda w, u: w - lr * u, params, u),)

    return step


def _pg(p_tree, g_tree):
    info = _layout.resolve_layouts(g_tree)

    def one(path, p, g):
        lay, _ = info[_layout.path_str(path)]
        return jnp.matmul(p, lay.to_matrix(g))

    return jax.tree_util.tree_map_with_path(one, p_tree, g_tree)


def _pg_flops(params) -> float:
    info = _layout.resolve_layouts(params)
    total = 0.0
    for lay, shape in info.values():
        _, d, m = lay.dims(shape)
        total += 2.0 * d * d * m
    return total


def bench_model(name: str, batch: int, rounds: int, budget: float) -> dict:
    params, x, y, loss, dense_rx = _problem(name, batch)
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    sgd, rgo = optax.sgd(0.1), rgo_jax.rgo(0.1)
    rgo16 = rgo_jax.rgo(0.1, dtype=jnp.bfloat16)
    rgo_in = rgo_jax.rgo(0.1, input_projected=dense_rx)
    s_sgd, s_rgo, s_16 = sgd.init(params), rgo.init(params), rgo16.init(params)
    p_tree = s_rgo[0].p
    g = jax.grad(loss)(params, x, y)
    own = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731 - each case donates its own
    cases = {
        "sgd": (_step(sgd, loss), (own(params), own(s_sgd), x, y), (0, 1)),
        "rgo": (_step(rgo, loss), (own(params), own(s_rgo), x, y), (0, 1)),
        "rgo_nodonate": (_step(rgo, loss), (params, s_rgo, x, y)),
        "rgo_input": (
            _step(rgo_in, loss, True),
            (own(params), own(rgo_in.init(params)), x, y),
            (0, 1),
        ),
        "rgo_bf16": (_step(rgo16, loss), (own(params), own(s_16), x, y), (0, 1)),
        "pg": (_pg, (p_tree, g)),
    }
    if name == "mlp":
        scale = jax.tree.map(lambda p: jnp.float32(1.0), p_tree)
        for kind in ("trace_full", "trace_diag", "scale_given"):
            step = _variant_step(loss, kind)
            cases[f"rgo_{kind}"] = (step, (own(params), p_tree, scale, x, y), (0,))
    t0 = time.perf_counter()
    res = C.time_cases(cases, rounds=rounds, max_total_s=budget)
    wall = time.perf_counter() - t0
    pg_flops = _pg_flops(params)
    base = res["sgd"]["median_s"]
    for r in res.values():
        r["over_sgd"] = r["median_s"] / base
        r["over_pg"] = r["median_s"] / res["pg"]["median_s"]
        r["gflops_per_s"] = (r["xla_flops"] or float("nan")) / r["median_s"] / 1e9
    return {
        "model": name,
        "batch": batch,
        "params": n_params,
        "pg_flops_analytic": pg_flops,
        "wall_s": wall,
        "cases": res,
    }


def bench_reference_matmul(rounds: int) -> dict:
    """A square float32 matmul, as the machine's attainable matmul rate."""
    n = 1024
    a = jnp.ones((n, n), jnp.float32)
    res = C.time_cases({"matmul_1024": (lambda a, b: a @ b, (a, a))}, rounds=rounds)
    r = res["matmul_1024"]
    r["gflops_per_s"] = 2 * n**3 / r["median_s"] / 1e9
    return r


def markdown(results: list[dict], ref: dict) -> str:
    out = [
        "Median of interleaved samples (min in brackets); compile time measured apart. "
        "`over_sgd` / `over_pg`: median ratio to the SGD step / to the bare P @ G products.",
        f"Reference: a 1024^3 float32 matmul runs at {ref['gflops_per_s']:.1f} GFLOP/s "
        f"({C.fmt_s(ref['median_s'])}).",
        "",
    ]
    for r in results:
        out.append(
            f"## {r['model']} (batch {r['batch']}, {r['params']:,} parameters; "
            f"P @ G = {r['pg_flops_analytic'] / 1e6:.1f} MFLOP per step)"
        )
        out.append("")
        rows = []
        for k, c in r["cases"].items():
            rows.append(
                [
                    k,
                    f"{C.fmt_s(c['median_s'])} ({C.fmt_s(c['min_s'])})",
                    f"{c['over_sgd']:.2f}",
                    f"{c['over_pg']:.2f}",
                    f"{(c['xla_flops'] or 0) / 1e6:.1f}",
                    f"{c['gflops_per_s']:.1f}",
                    f"{c['compile_s']:.2f} s",
                ]
            )
        out.append(
            C.md_table(["case", "step", "over_sgd", "over_pg", "MFLOP", "GFLOP/s", "compile"], rows)
        )
        out.append("")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mlp,alexnet,reduced_resnet18")
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--budget", type=float, default=60.0, help="timed seconds per model")
    ap.add_argument("--out", default="step")
    args = ap.parse_args()
    prov = C.provenance()
    ref = bench_reference_matmul(args.rounds)
    results = []
    for name in args.models.split(","):
        print(f"[bench_step] {name} ...", flush=True)
        r = bench_model(name, args.batch, args.rounds, args.budget)
        for k, c in r["cases"].items():
            print(
                f"  {k:16s} {C.fmt_s(c['median_s']):>10s}  x{c['over_sgd']:.2f} sgd  "
                f"x{c['over_pg']:.2f} pg  {c['gflops_per_s']:.1f} GFLOP/s",
                flush=True,
            )
        results.append(r)
    path = C.write_results(
        args.out, prov, {"reference_matmul": ref, "models": results}, markdown(results, ref)
    )
    print(f"[bench_step] wrote {path}")


if __name__ == "__main__":
    main()
