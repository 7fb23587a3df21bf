"""How the cost of RGO grows with width and depth (MLP family; table and plot).

Width: MLP ``784 - w - w - 10`` for ``w`` in 64 ... 2048. Depth: MLP ``784 - 256 x L - 10``
for ``L`` in 1 ... 8. For each network, at batch 10 and side by side (``_common.py``
protocol): the SGD step, the RGO step (``P @ G``), the RGO step with the input-side
projection of all dense kernels, and the consolidation of 256 vectors per P
(``update_projection``, block 64), reported per vector. Expected growth: ``P @ G`` is
``O(w^3)`` per layer, the input-side projection ``O(B w^2)``, the SGD step ``O(B w^2)``, one
consolidation vector ``O(w^2)`` per layer (block: ``O(w^2)`` flops per vector, done as
matrix products).

Command and cost (2-core CPU): ``python benchmarks/perf/bench_scaling.py``, about 3-4
minutes (the width-2048 RGO step is ~0.5 s). Writes ``scaling.{json,md,png}``.
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
from rgo_jax.bench.models import MLP
from rgo_jax.nnx import use_input_projection

WIDTHS = (64, 128, 256, 512, 1024, 2048)
DEPTHS = (1, 2, 4, 8)
CASES = ("sgd", "rgo", "rgo_input", "consolidation_per_vector")


def _measure(hidden: tuple[int, ...], rounds: int, budget: float, n_vec: int = 256) -> dict:
    model = MLP(784, hidden, 10, rngs=nnx.Rngs(0))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(10, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=10), jnp.int32)

    def loss(p, x, y, opt_state=None):
        m = nnx.merge(graph, p, rest)
        if opt_state is None:
            return optax.softmax_cross_entropy_with_integer_labels(m(x, 1), y).mean()
        with use_input_projection(m, opt_state):
            return optax.softmax_cross_entropy_with_integer_labels(m(x, 1), y).mean()

    def make(tx, input_projected=False):
        def step(p, s, x, y):
            u, s = tx.update(jax.grad(loss)(p, x, y, s if input_projected else None), s, p)
            return optax.apply_updates(p, u), s

        return step

    own = lambda t: jax.tree.map(jnp.copy, t)  # noqa: E731
    sgd, rgo, fast = optax.sgd(0.1), rgo_jax.rgo(0.1), rgo_jax.rgo(0.1, input_projected=r"kernel$")
    state = rgo.init(params)
    vecs = jax.tree.map(
        lambda p: jnp.asarray(rng.normal(size=(n_vec, p.shape[-1])) / 10, jnp.float32),
        state[0].p,
    )
    cases = {
        "sgd": (make(sgd), (own(params), own(sgd.init(params)), x, y), (0, 1)),
        "rgo": (make(rgo), (own(params), own(state), x, y), (0, 1)),
        "rgo_input": (make(fast, True), (own(params), own(fast.init(params)), x, y), (0, 1)),
        "consolidation": (
            lambda s, v: rgo_jax.consolidate(s, v, 0.01, method="block", block_size=64),
            (state, vecs),
        ),
    }
    res = C.time_cases(cases, rounds=rounds, max_total_s=budget)
    res["consolidation_per_vector"] = dict(res.pop("consolidation"))
    for k in ("median_s", "min_s", "q25_s", "q75_s"):
        res["consolidation_per_vector"][k] /= n_vec
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    p_elems = sum(math.prod(p.shape) for p in jax.tree.leaves(state[0].p))
    return {"hidden": list(hidden), "params": n_params, "p_elements": p_elems, "cases": res}


def plot(width_rows: list[dict], depth_rows: list[dict], path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    labels = {
        "sgd": "SGD step",
        "rgo": "RGO step (P @ G)",
        "rgo_input": "RGO step, input-side projection",
        "consolidation_per_vector": "consolidation, per vector (block 64)",
    }
    for ax, rows, xkey, xlabel in (
        (axes[0], width_rows, "width", "hidden width w (MLP 784-w-w-10)"),
        (axes[1], depth_rows, "depth", "hidden layers L (MLP 784-256xL-10)"),
    ):
        xs = [r[xkey] for r in rows]
        for case in CASES:
            med = np.array([r["cases"][case]["median_s"] for r in rows]) * 1e3
            lo = np.array([r["cases"][case]["q25_s"] for r in rows]) * 1e3
            hi = np.array([r["cases"][case]["q75_s"] for r in rows]) * 1e3
            ax.plot(xs, med, marker="o", label=labels[case])
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("time (ms), median; band: IQR")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("RGO cost vs width and depth (batch 10, this machine's CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _slope(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def markdown(width_rows: list[dict], depth_rows: list[dict], name: str) -> str:
    out = ["Median times (ms); consolidation per absorbed vector (256 per P, block 64).", ""]
    for rows, key, title in (
        (width_rows, "width", "Width (MLP 784-w-w-10)"),
        (depth_rows, "depth", "Depth (MLP 784-256xL-10)"),
    ):
        out += [f"## {title}", ""]
        table = []
        for r in rows:
            c = r["cases"]
            table.append(
                [
                    r[key],
                    f"{r['params']:,}",
                    f"{r['p_elements']:,}",
                    *(f"{c[k]['median_s'] * 1e3:.3f}" for k in CASES),
                    f"{c['rgo']['median_s'] / c['sgd']['median_s']:.1f}",
                    f"{c['rgo_input']['median_s'] / c['sgd']['median_s']:.1f}",
                ]
            )
        out.append(
            C.md_table([key, "params", "P elements", *CASES, "rgo/sgd", "rgo_input/sgd"], table)
        )
        xs = [r[key] for r in rows]
        tail = slice(max(0, len(xs) - 3), None)  # the 3 largest, where fixed costs fade
        slopes = ", ".join(
            f"{k} {_slope(xs[tail], [r['cases'][k]['median_s'] for r in rows][tail]):.2f}"
            for k in CASES
        )
        out += ["", f"Log-log slope over the 3 largest {key}s: {slopes}.", ""]
    out.append(f"![scaling]({name}.png)")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--depths", default=",".join(map(str, DEPTHS)))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--budget", type=float, default=15.0, help="timed seconds per network")
    ap.add_argument("--out", default="scaling")
    args = ap.parse_args()
    prov = C.provenance()
    t0 = time.perf_counter()
    width_rows, depth_rows = [], []
    for w in map(int, args.widths.split(",")):
        print(f"[scaling] width {w} ...", flush=True)
        width_rows.append(dict(_measure((w, w), args.rounds, args.budget), width=w))
    for depth in map(int, args.depths.split(",")):
        print(f"[scaling] depth {depth} ...", flush=True)
        depth_rows.append(dict(_measure((256,) * depth, args.rounds, args.budget), depth=depth))
    data = {"width": width_rows, "depth": depth_rows, "wall_s": time.perf_counter() - t0}
    path = C.write_results(args.out, prov, data, markdown(width_rows, depth_rows, args.out))
    plot(width_rows, depth_rows, path.with_suffix(".png"))
    print(f"[scaling] wrote {path} and {path.with_suffix('.png').name}")


if __name__ == "__main__":
    main()
