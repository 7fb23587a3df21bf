"""Optimizer-state memory of RGO per layer and in total, next to the parameter count.

Everything is computed from shapes (``jax.eval_shape``), so nothing is allocated: per
parameter tensor the shape of its P and its bytes in float32 (and bfloat16), per model the
totals next to the parameters' bytes, and XLA's temporary-buffer size of the compiled
``update_projection`` (1000 vectors, block method) and of one jitted train step (batch 10),
from ``compiled.memory_analysis()``.

Command and cost (2-core CPU): ``python benchmarks/perf/bench_memory.py``, about 1-2 minutes
(compiling the ResNet-18 consolidation and steps).
"""

from __future__ import annotations

import argparse
import math

import _common as C
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import rgo_jax
from rgo_jax import _layout
from rgo_jax.bench.models import build_model

MODELS = {
    "mlp": dict(input_shape=(28, 28, 1), num_classes=10),
    "alexnet": dict(input_shape=(32, 32, 3), num_classes=100),
    "resnet18": dict(input_shape=(32, 32, 3), num_classes=100),
    "reduced_resnet18": dict(input_shape=(32, 32, 3), num_classes=100),
}


def _abstract_model(name: str):
    cfg = MODELS[name]
    model = nnx.eval_shape(lambda: build_model(name, **cfg))
    graph, params, rest = nnx.split(model, nnx.Param, ...)
    return graph, params, rest, cfg


def _temp_bytes(fn, *args) -> int | None:
    try:
        return int(jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)
    except Exception as e:  # noqa: BLE001 - memory analysis is best effort
        print(f"[memory] no memory analysis: {type(e).__name__}: {e}"[:300], flush=True)
        return None


def model_memory(name: str, n_vectors: int = 1000, batch: int = 10) -> dict:
    graph, params, rest, cfg = _abstract_model(name)
    state = jax.eval_shape(rgo_jax.scale_by_rgo().init, params)
    state16 = jax.eval_shape(rgo_jax.scale_by_rgo(dtype=jnp.bfloat16).init, params)
    info = _layout.resolve_layouts(params)
    layers = []
    for path, p in jax.tree_util.tree_flatten_with_path(state.p)[0]:
        key = _layout.path_str(path)
        lay, shape = info[key]
        layers.append(
            {
                "path": key,
                "param_shape": list(shape),
                "param_bytes": math.prod(shape) * 4,
                "p_shape": list(p.shape),
                "p_bytes_f32": math.prod(p.shape) * 4,
                "p_over_param": math.prod(p.shape) / math.prod(shape),
            }
        )
    n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    out = {
        "model": name,
        "params": n_params,
        "param_bytes": C.tree_bytes(params),
        "rgo_state_bytes_f32": C.tree_bytes(state),
        "rgo_state_bytes_bf16": C.tree_bytes(state16),
        "sgd_state_bytes": C.tree_bytes(jax.eval_shape(optax.sgd(0.1).init, params)),
        "adam_state_bytes": C.tree_bytes(jax.eval_shape(optax.adam(1e-3).init, params)),
        "layers": sorted(layers, key=lambda r: -r["p_bytes_f32"]),
    }
    out["rgo_over_params"] = out["rgo_state_bytes_f32"] / out["param_bytes"]
    vecs = jax.tree.map(
        lambda p: jax.ShapeDtypeStruct((n_vectors, *p.shape[:-1]), jnp.float32), state.p
    )
    vecs = jax.tree.map(lambda v: None if v.shape[-1] == 0 else v, vecs)
    out["consolidation_temp_bytes"] = _temp_bytes(
        lambda s, v: rgo_jax.update_projection(s, v, method="block", block_size=64), state, vecs
    )
    x = jax.ShapeDtypeStruct((batch, *cfg["input_shape"]), jnp.float32)
    y = jax.ShapeDtypeStruct((batch,), jnp.int32)

    def loss(p, r, x, y):
        logits = nnx.merge(graph, p, r)(x, 1)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    for tag, tx in (("sgd", optax.sgd(0.1)), ("rgo", rgo_jax.rgo(0.1))):

        def step(p, s, r, x, y, tx=tx):
            u, s = tx.update(jax.grad(loss)(p, r, x, y), s, p)
            return optax.apply_updates(p, u), s

        s = jax.eval_shape(tx.init, params)
        out[f"step_temp_bytes_{tag}"] = _temp_bytes(step, params, s, rest, x, y)
    return out


def markdown(results: list[dict]) -> str:
    rows = []
    for r in results:
        rows.append(
            [
                r["model"],
                f"{r['params']:,}",
                C.fmt_bytes(r["param_bytes"]),
                C.fmt_bytes(r["rgo_state_bytes_f32"]),
                f"{r['rgo_over_params']:.1f}x",
                C.fmt_bytes(r["rgo_state_bytes_bf16"]),
                C.fmt_bytes(r["adam_state_bytes"]),
                C.fmt_bytes(r["consolidation_temp_bytes"] or 0),
                f"{C.fmt_bytes(r['step_temp_bytes_sgd'] or 0)} / "
                f"{C.fmt_bytes(r['step_temp_bytes_rgo'] or 0)}",
            ]
        )
    out = [
        "Bytes from shapes (`jax.eval_shape`); temporaries from XLA's `memory_analysis()` of the "
        "compiled function on this machine's backend (batch 10; 1000 vectors, block 64).",
        "",
        "## Totals",
        "",
        C.md_table(
            [
                "model",
                "params",
                "param bytes",
                "RGO state (f32)",
                "RGO / params",
                "RGO state (bf16)",
                "Adam state",
                "consolidation temp",
                "step temp SGD / RGO",
            ],
            rows,
        ),
    ]
    for r in results:
        out += ["", f"## {r['model']}: per layer (largest P first)", ""]
        lrows = [
            [
                layer["path"],
                "x".join(map(str, layer["param_shape"])),
                "x".join(map(str, layer["p_shape"])),
                C.fmt_bytes(layer["p_bytes_f32"]),
                f"{layer['p_over_param']:.2f}",
            ]
            for layer in r["layers"]
        ]
        out.append(C.md_table(["parameter", "shape", "P", "P bytes (f32)", "P / param"], lrows))
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--out", default="memory")
    args = ap.parse_args()
    prov = C.provenance()
    results = []
    for name in args.models.split(","):
        r = model_memory(name)
        print(
            f"[memory] {name}: params {r['params']:,} ({C.fmt_bytes(r['param_bytes'])}), "
            f"RGO state {C.fmt_bytes(r['rgo_state_bytes_f32'])} "
            f"({r['rgo_over_params']:.1f}x), consolidation temp "
            f"{C.fmt_bytes(r['consolidation_temp_bytes'] or 0)}",
            flush=True,
        )
        results.append(r)
    path = C.write_results(args.out, prov, {"models": results}, markdown(results))
    print(f"[memory] wrote {path}")


if __name__ == "__main__":
    main()
