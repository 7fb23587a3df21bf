"""EWC's diagonal Fisher: chunks of examples in one ``lax.scan`` vs one compiled call each.

``rgo_jax.baselines.diagonal_fisher`` vmaps the per-example backward passes over a chunk of
examples and runs the chunks either in a ``lax.scan`` (``loop="scan"``) or as separate calls
of one compiled chunk function (``loop="calls"``). This times both, side by side in
interleaved rounds, for each estimator (``exact``: a backward pass per example and task
class; ``sampled``: one per example) on the conv net of the conv benchmarks
(``configs/multi_dataset.json``: AlexNet-style, fc 256-256, 30-way head, a task of 10
classes) and the paper MLP (10-way head, 10 classes), and checks that both give the same
Fisher. The logits function is the harness's own (``_Net.logits`` at a fixed task).

Command and cost (2-core CPU, three processes sharing it): ``python
benchmarks/perf/bench_fisher.py``, about 8 minutes; ``--examples 160``, about 17.
"""

from __future__ import annotations

import argparse
import functools
import time

import _common as C
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from rgo_jax.baselines import diagonal_fisher
from rgo_jax.bench._methods import _AtTask
from rgo_jax.bench.models import build_model
from rgo_jax.bench.train import _Net

MODELS = {
    "alexnet": dict(num_classes=30, input_shape=(32, 32, 3), hidden=(256, 256), task=2),
    "mlp": dict(num_classes=10, input_shape=(28, 28, 1), hidden=(256, 256), task=1),
}


def _time_interleaved(fns: dict, rounds: int) -> dict[str, list[float]]:
    """Interleaved rounds of eager calls (``_common.time_cases`` jits each case, which
    would trace ``loop="calls"`` into one program)."""
    samples = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            samples[name].append(time.perf_counter() - t0)
    return samples


def model_case(name: str, n: int, rounds: int) -> dict:
    cfg = dict(MODELS[name])
    task = cfg.pop("task")
    graphdef, params, rest = nnx.split(build_model(name, **cfg), nnx.Param, ...)
    logits_fn = _AtTask(_Net(graphdef, rest).logits, task)
    rng = np.random.default_rng(0)
    k = cfg["num_classes"]
    x = jnp.asarray(rng.normal(size=(n, *cfg["input_shape"])), jnp.float32)
    y = jnp.asarray(rng.integers(k - 10, k, size=n), jnp.int32)
    mask = jnp.arange(k) >= k - 10
    out = {"model": name, "examples": n, "kept_classes": 10, "estimators": {}}
    for est in ("exact", "sampled"):
        key = jax.random.key(0) if est == "sampled" else None
        fns = {
            loop: functools.partial(
                diagonal_fisher, logits_fn, params, x, y, class_mask=mask, rng=key, loop=loop
            )
            for loop in ("scan", "calls")
        }
        first, first_s = {}, {}
        for tag, fn in fns.items():  # compiles
            t0 = time.perf_counter()
            first[tag] = jax.block_until_ready(fn())
            first_s[tag] = time.perf_counter() - t0
        err = max(
            float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30))
            for a, b in zip(
                jax.tree.leaves(first["scan"]), jax.tree.leaves(first["calls"]), strict=True
            )
        )
        samples = _time_interleaved(fns, rounds)
        med = {tag: float(np.median(s)) for tag, s in samples.items()}
        out["estimators"][est] = {
            "median_s": med,
            "min_s": {tag: float(np.min(s)) for tag, s in samples.items()},
            "first_call_s": first_s,
            "scan_over_calls": med["scan"] / med["calls"],
            "max_rel_diff": err,
            "rounds": rounds,
        }
        print(
            f"[fisher] {name} {est}: scan {C.fmt_s(med['scan'])}, calls "
            f"{C.fmt_s(med['calls'])} (scan / calls {med['scan'] / med['calls']:.2f}), "
            f"max rel diff {err:.1e}",
            flush=True,
        )
    return out


def markdown(results: list[dict]) -> str:
    rows = []
    for r in results:
        for est, e in r["estimators"].items():
            rows.append(
                [
                    r["model"],
                    est,
                    r["examples"],
                    C.fmt_s(e["median_s"]["scan"]),
                    C.fmt_s(e["median_s"]["calls"]),
                    f"{e['scan_over_calls']:.2f}",
                    f"{e['max_rel_diff']:.1e}",
                ]
            )
    return "\n".join(
        [
            "Diagonal Fisher of one task (10 kept classes), chunks of 16 examples: one "
            '`lax.scan` over the chunks (`loop="scan"`) vs a compiled call per chunk '
            '(`loop="calls"`). Medians of interleaved rounds; the first (compiling) call '
            "excluded.",
            "",
            C.md_table(
                [
                    "model",
                    "estimator",
                    "examples",
                    "scan",
                    "calls",
                    "scan / calls",
                    "max rel diff",
                ],
                rows,
            ),
        ]
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--examples", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default="fisher")
    args = ap.parse_args()
    prov = C.provenance()
    results = [model_case(m, args.examples, args.rounds) for m in args.models.split(",")]
    path = C.write_results(args.out, prov, {"models": results}, markdown(results))
    print(f"[fisher] wrote {path}")


if __name__ == "__main__":
    main()
