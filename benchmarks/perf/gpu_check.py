"""One-shot accelerator check: ResNet-18 (width 64) RGO step vs SGD, and consolidation speed.

Sized to finish in about 3-5 minutes on one GPU (most of it compilation), it measures on
synthetic 32x32x3 data at batch 10 (the paper's CIFAR-100 setting, 100-class head):

* ``step``: the jitted train step of plain SGD (the base optimizer) and of RGO
  (``rgo_jax.rgo``), both donating params and state; the bare ``P @ G`` products; and the
  RGO step with P stored in bfloat16 (not in ``--small``). Compile time apart, median of
  repeats. ``checks.rgo_update_finite``: the params after the timed RGO steps are finite.
* ``consolidation``: curvature vectors of ``--batches`` batches (``vmap``, with reduced
  kernel gradients) and ``update_projection`` of ``--vectors`` vectors into every P
  (block method, called outside ``jit`` as at a task boundary), as vectors per second.
* ``checks``: the RGO update is finite, every P stays symmetric with a positive diagonal.

Prints one JSON line at the end (and writes it to ``--out``). ``--small`` runs a tiny
configuration (width 8, no FEL, few vectors) that finishes in well under a minute on a CPU, so the
script itself is tested in the CPU suite.

Command: ``python benchmarks/perf/gpu_check.py --out gpu_check.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
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
from rgo_jax.nnx import use_reduced_kernel_gradients


def _config(args) -> dict:
    if args.small:
        # Without FEL: its 22 task-keyed permutations triple the CPU compile time.
        return dict(
            small=True, width=8, fel=False, batch=10, batches=4, vectors=64, block=32, rounds=3
        )
    return dict(
        small=False,
        width=64,
        fel=True,
        batch=10,
        batches=args.batches,
        vectors=args.vectors,
        block=args.block,
        rounds=args.rounds,
    )


def _pg(p_tree, g_tree):
    info = _layout.resolve_layouts(g_tree)

    def one(path, p, g):
        lay, _ = info[_layout.path_str(path)]
        return jnp.matmul(p, lay.to_matrix(g))

    return jax.tree_util.tree_map_with_path(one, p_tree, g_tree)


def _model(cfg: dict, rng: np.random.Generator):
    """The ResNet-18's graph, params and FEL keys, initialised without compiling anything.

    Eager initialisation compiles one small program per layer shape (16 s on a CPU, and
    device time on a GPU); for timing, LeCun-normal kernels from numpy and zero biases do.
    """
    abstract = nnx.eval_shape(
        lambda: build_model(
            "resnet18",
            num_classes=100,
            input_shape=(32, 32, 3),
            width=cfg["width"],
            fel=cfg["fel"],
            seed=0,
        )
    )
    graph, params, rest = nnx.split(abstract, nnx.Param, ...)

    def init(s):
        if len(s.shape) <= 1:
            return jnp.asarray(np.zeros(s.shape, s.dtype))
        w = rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1]))
        return jnp.asarray(w.astype(s.dtype))

    counter = iter(range(10**6))

    def init_rest(s):
        if jax.dtypes.issubdtype(s.dtype, jax.dtypes.prng_key):
            return jax.random.key(next(counter))
        return jnp.asarray(np.zeros(s.shape, s.dtype))

    return graph, jax.tree.map(init, params), jax.tree.map(init_rest, rest)


def _time_eager_update(state, vecs, cfg: dict, outs: dict) -> dict:
    """``update_projection`` timed as a task boundary calls it: outside ``jit``.

    There it runs in two stages (the fast kernel and its check as one program; the
    square-root fallback compiled and run only where a check fails), so the first call
    compiles only the first stage: less compile time and memory than the one program a
    ``jit`` around the call builds (with the fallback of every size of P in it).
    ``compile_s`` is the first call's time (compilation and one run).
    """

    def call():
        outs["rls_block"] = jax.block_until_ready(
            rgo_jax.update_projection(state, vecs, block_size=cfg["block"])
        )

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    samples, _ = C.time_calls(
        {"rls_block": call}, rounds=cfg["rounds"], min_sample_s=0.0, max_total_s=60.0
    )
    return {**C.summarize(samples["rls_block"]), "compile_s": first, "xla_flops": None}


def run(cfg: dict) -> dict:
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    graph, params, rest = _model(cfg, rng)
    b = cfg["batch"]
    x = jnp.asarray(rng.normal(size=(b, 32, 32, 3)).astype(np.float32))
    y = jnp.asarray(rng.integers(0, 5, size=b).astype(np.int32))

    def loss(p, x, y):
        logits = nnx.merge(graph, p, rest)(x, 1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def make(tx):
        def step(p, s, x, y):
            u, s = tx.update(jax.grad(loss)(p, x, y), s, p)
            return optax.apply_updates(p, u), s

        return step

    own = lambda t: jax.device_put(t, may_alias=False)  # noqa: E731 - new buffers, no compile
    sgd, rgo, rgo16 = optax.sgd(0.03), rgo_jax.rgo(0.03), rgo_jax.rgo(0.03, dtype=jnp.bfloat16)
    s_rgo = jax.jit(rgo.init)(params)  # one program, not one small one per leaf
    # Stand-in gradients for the bare P @ G timing (only their shapes matter).
    g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape).astype(np.float32)), params)
    step_cases = {
        "base": (make(sgd), (own(params), own(sgd.init(params)), x, y), (0, 1)),
        "rgo": (make(rgo), (own(params), own(s_rgo), x, y), (0, 1)),
        "pg": (_pg, (s_rgo[0].p, g)),
    }
    if not cfg["small"]:
        step_cases["rgo_bf16"] = (
            make(rgo16),
            (own(params), jax.jit(rgo16.init)(params), x, y),
            (0, 1),
        )
    step_outs: dict = {}
    steps = C.time_cases(step_cases, rounds=cfg["rounds"], max_total_s=60.0, outputs=step_outs)
    trained = step_outs["rgo"][0]  # params after the timed RGO steps

    # Consolidation: curvature vectors of several batches, then the RLS update.
    nb = cfg["batches"]
    xs = jnp.asarray(rng.normal(size=(nb, b, 32, 32, 3)).astype(np.float32))
    ys = jnp.asarray(rng.integers(0, 5, size=(nb, b)).astype(np.int32))

    def fast_logits(p, x):
        m = nnx.merge(graph, p, rest)
        with use_reduced_kernel_gradients(m):
            return m(x, 1)

    vec_fn = lambda p, xs, ys: rgo_jax.curvature_vectors(fast_logits, p, xs, ys)  # noqa: E731
    n = cfg["vectors"]
    state = s_rgo[0]
    vecs = jax.tree.map(
        lambda p: jnp.asarray(
            (rng.normal(size=(n, p.shape[-1])) / np.sqrt(p.shape[-1])).astype(np.float32)
        ),
        state.p,
    )
    vecs = jax.tree.map(lambda p, v: None if p.shape[-1] == 0 else v, state.p, vecs)
    outs: dict = {}
    cons = C.time_cases(
        {"vectors": (vec_fn, (params, xs, ys))},
        rounds=cfg["rounds"],
        max_total_s=60.0,
        min_sample_s=0.0,
        outputs=outs,
    )
    cons["rls_block"] = _time_eager_update(state, vecs, cfg, outs)
    # The checks run in NumPy on the host (exact, and no small program compiled per shape).
    new_p = [np.asarray(p) for p in jax.tree.leaves(outs["rls_block"].p) if p.size]
    sym = max(float(np.max(np.abs(p - p.T))) for p in new_p)
    diag_ok = all(bool(np.all(np.diagonal(p) > 0)) for p in new_p)

    dev = jax.devices()[0]
    mem = None
    try:
        mem = dev.memory_stats()
    except Exception:  # noqa: BLE001 - not every backend reports memory
        mem = None
    p_elems = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.p))

    def brief(r: dict) -> dict:
        keys = ("median_s", "min_s", "compile_s", "xla_flops", "samples")
        return {k: r[k] for k in keys}

    result = {
        "config": cfg,
        "device": {
            "backend": jax.default_backend(),
            "kind": dev.device_kind,
            "count": len(jax.devices()),
            "peak_bytes_in_use": None if not mem else mem.get("peak_bytes_in_use"),
        },
        "jax": jax.__version__,
        "git_commit": C.git_commit(),
        "params": int(sum(np.prod(p.shape) for p in jax.tree.leaves(params))),
        "p_elements": p_elems,
        "step": {k: brief(v) for k, v in steps.items()},
        "consolidation": {
            "vectors": brief(cons["vectors"]),
            "rls_block": brief(cons["rls_block"]),
            "num_batches": nb,
            "num_vectors": n,
            "vectors_per_s": n / cons["rls_block"]["median_s"],
            "batches_per_s": nb / cons["vectors"]["median_s"],
        },
        "checks": {
            "rgo_update_finite": all(
                bool(np.all(np.isfinite(np.asarray(u)))) for u in jax.tree.leaves(trained)
            ),
            "p_symmetric": sym == 0.0,
            "p_max_asymmetry": sym,
            "p_positive_diagonal": diag_ok,
        },
    }
    step = result["step"]
    step["rgo_over_base"] = step["rgo"]["median_s"] / step["base"]["median_s"]
    step["rgo_over_pg"] = step["rgo"]["median_s"] / step["pg"]["median_s"]
    if "rgo_bf16" in step:
        step["bf16_over_f32"] = step["rgo_bf16"]["median_s"] / step["rgo"]["median_s"]
    result["wall_s"] = time.perf_counter() - t_start
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny CPU-sized configuration")
    ap.add_argument("--batches", type=int, default=50, help="curvature batches (GPU run)")
    ap.add_argument("--vectors", type=int, default=1000, help="RLS vectors per P (GPU run)")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the JSON here")
    args = ap.parse_args()
    result = run(_config(args))
    text = json.dumps(result, default=float)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    sys.stdout.write(text + "\n")


if __name__ == "__main__":
    main()
