"""Why RGO forgets where it does: measurements taken at every task boundary of a real run.

Runs the benchmark harness (``rgo-bench``, any of its flags) with the RGO methods wrapped so
that each task boundary also records, per projected leaf:

* the curvature vectors of the consolidation pass: their norms (mean, median, max),
  ``tr(sum v v^T) / d`` and how that compares with alpha;
* the spectrum of P after consolidation (float64 eigenvalues): ``tr(P) / d``, the smallest,
  quantiles, and how much of the space is left (eigenvalues of the trace-normalised
  ``P d / tr P`` above 0.5, "free") or protected (below 0.01);
* the parameters after each task, and a sample of each task's training data.

After the last task, for every earlier task ``j``, the accuracy on its training sample with
the final parameters, and with one layer (kernel and bias) put back to its value right
after task ``j``: which layer's drift costs task ``j`` its accuracy.

Writes ``diagnostics.json`` and ``diagnostics.md`` into ``--diag-out`` (plus the run's usual
report in ``--out``). Example (one seed, the paper protocol)::

    PYTHONPATH=. python benchmarks/rgo_diagnostics.py --diag-out results/extension_diag \\
        --config benchmarks/configs/permuted_mnist.json --data-dir DATA --methods rgo \\
        --seeds 0 --input-projection --out runs/diag
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from _provenance import git_commit

from rgo_jax import _layout, _matrices, _transform
from rgo_jax.bench import _methods, cli

SAMPLE = 1000  # training examples kept per task for the attribution


class Recorder:
    """Per method: the records of every task boundary (one seed per run)."""

    def __init__(self):
        self.tasks: dict[str, list] = {}
        self.params: dict[str, list] = {}
        self.data: dict[str, list] = {}
        self.ctx: dict[str, object] = {}


REC = Recorder()


def _leaves(tree) -> dict[str, np.ndarray]:
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_layout.path_str(p): np.asarray(v) for p, v in flat if v is not None}


def _spectrum(p: np.ndarray, alpha) -> dict:
    p = np.asarray(p, np.float64).reshape(-1, p.shape[-1], p.shape[-1])[0]
    ev = np.linalg.eigvalsh((p + p.T) / 2)
    d = ev.size
    norm = ev * d / ev.sum()
    return {
        "d": d,
        "trace_over_d": float(ev.mean()),
        "min": float(ev.min()),
        "q10": float(np.quantile(ev, 0.1)),
        "q50": float(np.quantile(ev, 0.5)),
        "max": float(ev.max()),
        "free_fraction": float(np.mean(ev > 0.5)),  # directions barely touched (P ~ I)
        "protected_fraction": float(np.mean(ev < 0.01)),
        "normalised_min": float(norm.min()),
        "normalised_max": float(norm.max()),
        "normalised_q10": float(np.quantile(norm, 0.1)),
    }


def _vector_stats(v: np.ndarray, alpha: float) -> dict:
    v = np.asarray(v, np.float64).reshape(v.shape[0], -1)
    norms = np.linalg.norm(v, axis=1)
    d = v.shape[1]
    return {
        "n": int(v.shape[0]),
        "norm_mean": float(norms.mean()),
        "norm_median": float(np.median(norms)),
        "norm_max": float(norms.max()),
        "trace_sum_vvT_over_d": float((norms**2).sum() / d),
        "alpha_over_mean_sq_norm": float(alpha / max((norms**2).mean(), 1e-30)),
    }


def _alpha_of(alpha, name):
    return float(alpha[name]) if isinstance(alpha, dict) else float(alpha)


def wrap(method: _methods.RGO) -> _methods.RGO:
    """The same RGO preset whose ``after_task`` also records (a subclass, same numbers)."""

    @dataclasses.dataclass(frozen=True)
    class Recorded(type(method)):
        def after_task(self, ctx, params, opt_state, extra):
            vecs_seen = {}
            original = _methods.curvature_vectors

            def spy(*args, **kwargs):
                out = original(*args, **kwargs)
                vecs_seen.update(_leaves(out))
                return out

            consolidate = _transform.consolidate
            alphas = {}

            def spy_consolidate(state, vectors, alpha=_transform.DEFAULT_ALPHA, **kw):
                alphas["alpha"] = alpha
                return consolidate(state, vectors, alpha, **kw)

            _methods.curvature_vectors = spy
            _transform.consolidate = spy_consolidate
            try:
                opt_state, extra = super().after_task(ctx, params, opt_state, extra)
            finally:
                _methods.curvature_vectors = original
                _transform.consolidate = consolidate
            alpha = alphas.get("alpha", self.options.alpha)
            state = _transform.rgo_states(opt_state)[0]
            ps = _matrices.projected(state.p)
            rec = {"task": int(ctx.task), "leaves": {}}
            for name, p in ps.items():
                a = _alpha_of(alpha, name)
                rec["leaves"][name] = {
                    "alpha": a,
                    "vectors": _vector_stats(vecs_seen[name], a) if name in vecs_seen else None,
                    "P": _spectrum(np.asarray(p), a),
                }
            # the mean step scale of each leaf under global trace normalisation,
            # (tr P_l / d_l) / t_bar, with t_bar weighted by the leaves' parameter counts
            sizes = {k: v.size for k, v in _leaves(params).items()}
            t = {k: s["P"]["trace_over_d"] for k, s in rec["leaves"].items()}
            t_bar = sum(sizes[k] * t[k] for k in t) / sum(sizes[k] for k in t)
            for k, s in rec["leaves"].items():
                s["global_step_scale"] = t[k] / t_bar
            REC.tasks.setdefault(self.name, []).append(rec)
            REC.params.setdefault(self.name, []).append(jax.tree.map(np.asarray, params))
            rng = np.random.default_rng(int(ctx.task))
            idx = rng.choice(len(ctx.x_train), size=min(SAMPLE, len(ctx.x_train)), replace=False)
            REC.data.setdefault(self.name, []).append(
                (ctx.x_train[idx], ctx.y_train[idx], np.asarray(ctx.class_mask))
            )
            REC.ctx[self.name] = ctx.logits_fn
            return opt_state, extra

    return Recorded(**{f.name: getattr(method, f.name) for f in dataclasses.fields(method)})


def _accuracy(logits_fn, params, x, y, mask, task) -> float:
    z = np.asarray(logits_fn(params, jnp.asarray(x), jnp.int32(task)))
    z = np.where(mask[None], z, -np.inf)
    return float(np.mean(z.argmax(1) == y))


def _layer(name: str) -> str:
    return name.rsplit("/", 1)[0]


def attribution(name: str) -> list[dict]:
    """For every earlier task: accuracy with the final params and with one layer restored."""
    params, data, logits_fn = REC.params[name], REC.data[name], REC.ctx[name]
    final = params[-1]
    flat_final = jax.tree_util.tree_flatten_with_path(final)
    names = [_layout.path_str(p) for p, _ in flat_final[0]]
    groups = {
        layer: [n for n in names if _layer(n) == layer] for layer in sorted(map(_layer, names))
    }
    groups.update({n: [n] for n in names})
    groups["all biases"] = [n for n in names if n.endswith("bias")]
    groups["all kernels"] = [n for n in names if n.endswith("kernel")]
    out = []
    for j in range(len(params) - 1):
        x, y, mask = data[j]
        row = {
            "task": j,
            "after_task": _accuracy(logits_fn, params[j], x, y, mask, j),
            "final": _accuracy(logits_fn, final, x, y, mask, j),
            "restored": {},
        }
        for group, members in groups.items():

            def pick(path, f, old, members=members):
                return old if _layout.path_str(path) in members else f

            mixed = jax.tree_util.tree_map_with_path(pick, final, params[j])
            row["restored"][group] = _accuracy(logits_fn, mixed, x, y, mask, j)
        drift = {}
        for (path, f), old in zip(flat_final[0], jax.tree.leaves(params[j]), strict=True):
            drift[_layout.path_str(path)] = float(
                np.linalg.norm(f - old) / max(np.linalg.norm(old), 1e-12)
            )
        row["relative_drift"] = drift
        out.append(row)
    return out


def markdown(report: dict) -> str:
    lines = [
        f"# RGO diagnostics\n\n- command: `{report['command']}`",
        f"- commit: `{report['commit']}`",
    ]
    lines.append(f"- machine: {report['machine']}\n")
    for name, m in report["methods"].items():
        lines.append(f"## {name}\n")
        lines.append("### Curvature vectors and P after each task (per leaf)\n")
        lines.append(
            "| task | leaf | d | mean norm of v | tr(sum vv^T)/d | alpha/mean norm^2 | tr P/d | "
            "free (eig>0.5) | protected (eig<0.01) | min eig of normalised P | "
            "step scale if normalised globally |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for rec in m["tasks"]:
            if rec["task"] not in (0, 1, 4, 9, 14, 19) and rec["task"] != len(m["tasks"]) - 1:
                continue
            for leaf, s in rec["leaves"].items():
                v, p = s["vectors"] or {}, s["P"]
                lines.append(
                    f"| {rec['task']} | {leaf} | {p['d']} | "
                    f"{v.get('norm_mean', float('nan')):.3g} | "
                    f"{v.get('trace_sum_vvT_over_d', float('nan')):.3g} | "
                    f"{v.get('alpha_over_mean_sq_norm', float('nan')):.3g} | "
                    f"{p['trace_over_d']:.3g} | {p['free_fraction']:.2f} | "
                    f"{p['protected_fraction']:.2f} | {p['normalised_min']:.2e} | "
                    f"{s['global_step_scale']:.3g} |"
                )
        att = m["attribution"]
        if att:
            mean_after = 100 * np.mean([r["after_task"] for r in att])
            mean_final = 100 * np.mean([r["final"] for r in att])
            old5 = att[:5]
            lines.append(
                "\n### Which parameters' drift costs old tasks (training-sample accuracy, %)\n"
            )
            lines.append(
                f"Mean over the {len(att)} earlier tasks: {mean_after:.2f} right after each was "
                f"trained, {mean_final:.2f} with the final parameters. Below: the final "
                "parameters with one group put back to its value right after each task.\n"
            )
            lines.append("| restored | mean, all earlier tasks | recovered | mean, tasks 0-4 |")
            lines.append("|---|---|---|---|")
            for group in att[0]["restored"]:
                mean = 100 * np.mean([r["restored"][group] for r in att])
                m5 = 100 * np.mean([r["restored"][group] for r in old5])
                lines.append(f"| {group} | {mean:.2f} | {mean - mean_final:+.2f} | {m5:.2f} |")
            lines.append(
                f"| nothing | {mean_final:.2f} | 0 | "
                f"{100 * np.mean([r['final'] for r in old5]):.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--diag-out", required=True)
    ns, rest = ap.parse_known_args(argv)
    # wrap every RGO preset in the registry (the CLI looks methods up there)
    for name, m in list(_methods.METHODS.items()):
        if isinstance(m, _methods.RGO):
            _methods.METHODS[name] = wrap(m)
    t0 = time.time()
    rc = cli.main(rest)
    report = {
        "command": "python benchmarks/rgo_diagnostics.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "commit": git_commit(),
        "machine": f"{platform.platform()}, {jax.__version__} ({jax.default_backend()}), "
        f"wall {time.time() - t0:.0f} s",
        "methods": {
            name: {"tasks": REC.tasks[name], "attribution": attribution(name)} for name in REC.tasks
        },
    }
    out = Path(ns.diag_out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(report, indent=1))
    (out / "diagnostics.md").write_text(markdown(report))
    print(f"diagnostics in {out}/")
    return rc


if __name__ == "__main__":
    sys.exit(main())
