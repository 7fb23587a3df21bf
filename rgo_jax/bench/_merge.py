"""Merging finished runs of one protocol into one report (more seeds, more methods)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from rgo_jax.bench._run_report import write_run_report

__all__ = ["merge_run_reports"]

# Keys the merge itself accounts for: what it combines (methods, seeds, method options), what
# an earlier merge added, and the software that ran. The harness names its own speed and
# output switches through ``free_keys``.
_MERGE_OWN_KEYS = frozenset(
    {
        "methods",
        "seeds",
        "method_options",
        "method_options_per_method",
        "jax",
        "backend",
        "merged_from",
        "merged_excluded",
        "seeds_per_method",
    }
)


def _read_run(run_dir: str | os.PathLike) -> tuple[dict, dict]:
    out = []
    for name in ("config.json", "results.json"):
        path = os.path.join(run_dir, name)
        try:
            with open(path, encoding="utf-8") as f:
                out.append(json.load(f))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: missing; not a run directory.") from None
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err}).") from None
    config, results = out
    if not isinstance(results.get("methods"), Mapping) or "seeds" not in config:
        raise ValueError(f"{run_dir}: results.json has no 'methods' or config.json no 'seeds'.")
    return config, results


def merge_run_reports(
    run_dirs: Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    *,
    free_keys: Iterable[str] = (),
    key_defaults: Mapping[str, Any] | None = None,
    exclude: Iterable[tuple[str | os.PathLike, str]] = (),
    plots: bool = True,
) -> dict[str, dict[str, Any]]:
    """Merges finished runs of one protocol into one report (e.g. more seeds, more methods).

    Each run directory is one written by :func:`write_run_report` from the benchmark harness
    (``config.json`` with ``seeds``, ``results.json``). The runs must agree on every
    configuration key but the methods, the seeds, the method options, the software versions
    and ``free_keys``. The runs that give one method must agree on every method option they
    both set; runs of different methods may differ (the merged ``config.json`` keeps each
    method's options in ``method_options_per_method``). A (method, seed) pair may come from
    one run only. The merged matrices are ordered by seed, and the merged ``config.json``
    records the source runs (directory names only) and the seeds of every method.

    Args:
      run_dirs: the run directories, in any order.
      out_dir: where the merged report is written.
      free_keys: further configuration keys the runs may differ in: switches of the harness
        that do not change the protocol (for the benchmark harness,
        :data:`rgo_jax.bench.train.MERGE_FREE_KEYS`). The merged ``config.json`` keeps the first
        run's values of these.
      key_defaults: the value a configuration key had before it existed, for keys added
        after some runs were written (for the benchmark harness,
        :data:`rgo_jax.bench.train.ADDED_KEYS`): a run whose ``config.json`` lacks the key is
        compared, and merged, as if it had this value.
      exclude: ``(run_dir, method)`` pairs left out of the merge: a method of a run that a
        later run supersedes (e.g. rerun with another hyperparameter).
      plots: draw the PNG plots.

    Returns:
      ``{method: summary}``, as :func:`write_run_report`.
    """
    if not run_dirs:
        raise ValueError("merge_run_reports needs at least one run directory.")
    if isinstance(free_keys, str):
        raise TypeError(
            f"free_keys must be a collection of key names, not the string {free_keys!r}."
        )
    keys = [os.path.normpath(d) for d in run_dirs]
    skip = _exclusions(keys, exclude)
    protocol = _Protocol(_MERGE_OWN_KEYS | set(free_keys))
    # Method options are checked per method: the runs that give one method must agree on
    # every option they both set (runs of other methods may use other values).
    options = _MethodOptions()
    per_method: dict[str, dict[int, tuple[Any, Any]]] = {}
    for run_dir, key in zip(run_dirs, keys, strict=True):
        config, results = _read_run(run_dir)
        config = {**(key_defaults or {}), **config}
        unknown = skip.get(key, set()) - set(results["methods"])
        if unknown:
            raise ValueError(
                f"exclude names method(s) {sorted(unknown)} that {run_dir} does not have "
                f"(it has {sorted(results['methods'])})."
            )
        protocol.check(run_dir, config, results)
        for method, entry in results["methods"].items():
            if method in skip.get(key, ()):
                continue
            # A rerun that kept earlier results records each method's own seeds.
            seeds = [
                int(s) for s in (config.get("seeds_per_method") or {}).get(method, config["seeds"])
            ]
            options.add(run_dir, method, config)
            _add_seeds(per_method.setdefault(method, {}), run_dir, method, entry, seeds)
    matrices, random_init = _merged_matrices(per_method)
    config = _merged_config(protocol.base, per_method, options.options, keys, skip)
    return write_run_report(
        out_dir,
        config=config,
        matrices=matrices,
        random_init=random_init or None,
        bwt_divisor=protocol.conventions[0],
        ddof=protocol.conventions[1],
        plots=plots,
    )


def _exclusions(keys: list[str], exclude) -> dict[str, set[str]]:
    """``exclude`` as ``{normalised run dir: methods}``, each run dir one of ``keys``."""
    skip: dict[str, set[str]] = {}
    for run_dir, method in exclude:
        key = os.path.normpath(run_dir)
        if key not in keys:
            raise ValueError(f"exclude names {run_dir}, which is not one of the runs merged.")
        skip.setdefault(key, set()).add(method)
    return skip


class _Protocol:
    """The first run's protocol (its configuration but ``free`` keys, its conventions);
    every later run must match it."""

    def __init__(self, free: set[str]):
        self.free = free
        self.base: dict | None = None
        self.base_dir = None
        self.conventions = None
        self.keys: dict = {}

    def check(self, run_dir, config: dict, results: dict) -> None:
        conv = (results.get("bwt_divisor", "T-1"), results.get("std_ddof", 0))
        protocol = {k: v for k, v in config.items() if k not in self.free}
        if self.base is None:
            self.base, self.base_dir, self.conventions = config, run_dir, conv
            self.keys = protocol
            return
        for k in sorted(set(self.keys) | set(protocol)):
            if self.keys.get(k) != protocol.get(k):
                raise ValueError(
                    f"{run_dir} and {self.base_dir} differ in {k!r} "
                    f"({protocol.get(k)!r} vs {self.keys.get(k)!r}): not one protocol."
                )
        if conv != self.conventions:
            raise ValueError(
                f"{run_dir} uses BWT divisor / std ddof {conv}, {self.base_dir} uses "
                f"{self.conventions}."
            )


class _MethodOptions:
    """Each method's options over the runs that give it (which must agree on shared keys)."""

    def __init__(self):
        self.options: dict[str, dict[str, Any]] = {}
        self.sources: dict[str, dict[str, str]] = {}

    def add(self, run_dir, method: str, config: dict) -> None:
        run_options = (config.get("method_options_per_method") or {}).get(
            method, config.get("method_options") or {}
        )
        opts = self.options.setdefault(method, {})
        srcs = self.sources.setdefault(method, {})
        for k, v in run_options.items():
            if k in opts and opts[k] != v:
                raise ValueError(
                    f"method option {k!r} is {v!r} in {run_dir} but {opts[k]!r} in "
                    f"{srcs[k]}, and both give method {method!r}."
                )
            opts[k], srcs[k] = v, str(run_dir)


def _add_seeds(slot: dict, run_dir, method: str, entry: dict, seeds: list[int]) -> None:
    """Adds one run's ``(matrix, random-init row)`` of ``method`` per seed to ``slot``."""
    mats = entry.get("matrices") or []
    if len(mats) != len(seeds):
        raise ValueError(
            f"{run_dir}: method {method!r} has {len(mats)} matrices for the "
            f"{len(seeds)} seeds {seeds} (an unfinished run?)."
        )
    init = entry.get("random_init")
    init_rows = np.asarray(init, dtype=np.float64) if init is not None else None
    for i, seed in enumerate(seeds):
        if seed in slot:
            raise ValueError(
                f"method {method!r}, seed {seed} is in {run_dir} and in an earlier run."
            )
        row = None
        if init_rows is not None:
            row = init_rows[i] if init_rows.ndim == 2 else init_rows
        slot[seed] = (mats[i], row)


def _merged_matrices(per_method: dict) -> tuple[dict, dict]:
    """Per method, the matrices (``None`` cells as NaN) and random-init rows, by seed."""
    matrices, random_init = {}, {}
    for method, slot in per_method.items():
        order = sorted(slot)
        matrices[method] = [
            np.array([[np.nan if v is None else v for v in r] for r in slot[s][0]]) for s in order
        ]
        rows = [slot[s][1] for s in order]
        if all(r is not None for r in rows):
            random_init[method] = np.stack(rows)
    return matrices, random_init


def _merged_config(base: dict, per_method: dict, options: dict, keys, skip) -> dict:
    """The first run's configuration with the merged methods, seeds, options and sources."""
    config = dict(base)
    config["methods"] = list(per_method)
    config["seeds"] = sorted({s for slot in per_method.values() for s in slot})
    # Top level: the options on which every method agrees; per method: all of its own.
    shared: dict[str, Any] = {}
    clash: set[str] = set()
    for opts in options.values():
        for k, v in opts.items():
            if k in shared and shared[k] != v:
                clash.add(k)
            shared.setdefault(k, v)
    config["method_options"] = {k: v for k, v in shared.items() if k not in clash}
    config["method_options_per_method"] = options
    config["seeds_per_method"] = {m: sorted(slot) for m, slot in per_method.items()}
    config["merged_from"] = [os.path.basename(k) for k in keys]
    if skip:
        config["merged_excluded"] = {os.path.basename(k): sorted(m) for k, m in skip.items()}
    return config
