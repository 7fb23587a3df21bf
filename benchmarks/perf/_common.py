"""Shared timing, provenance and output helpers for the performance benchmarks.

Timing protocol (every script): each case is jit-compiled ahead of time (``lower`` +
``compile``, timed separately as ``compile_s``), called once more (``first_call_s``, not
counted), then all cases of a comparison run in *interleaved* rounds (A, B, C, A, B, C,
...) so that a burst of load from other processes hits every case alike. One sample is the
mean of ``inner`` back-to-back calls (each ending in ``block_until_ready``), with ``inner``
chosen so that a sample lasts at least ~5 ms; the reported time is the median of the
samples, with the min and the inter-quartile range beside it.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import numpy as np  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "perf"


def cpu_model() -> str:
    """The CPU model name from ``/proc/cpuinfo`` (or ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """``HEAD``'s hash, with ``+dirty`` when the benchmark files differ from it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "rgo_jax", "benchmarks/perf"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    """Where and with what a result was measured."""
    import flax
    import optax

    dev = jax.devices()
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": affinity,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or _jaxlib_version(),
        "optax": optax.__version__,
        "flax": flax.__version__,
        "numpy": np.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in dev],
        "device_kind": dev[0].device_kind,
        "loadavg_start": list(os.getloadavg()),
    }


def _jaxlib_version() -> str:
    import jaxlib

    return jaxlib.__version__


def provenance() -> dict[str, Any]:
    """Command, commit, time and machine of this run."""
    return {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "git_commit": git_commit(),
        "utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
    }


def _block(x: Any) -> Any:
    return jax.block_until_ready(x)


class _Case:
    """A compiled function and its live arguments (donated ones are replaced by outputs)."""

    def __init__(self, fn: Callable, args: Sequence[Any], donate: Sequence[int] = ()):
        self.donate = tuple(donate)
        jitted = jax.jit(fn, donate_argnums=self.donate)
        self.args = list(args)
        t0 = time.perf_counter()
        lowered = jitted.lower(*self.args)
        t1 = time.perf_counter()
        self.compiled = lowered.compile()
        t2 = time.perf_counter()
        self.call()
        t3 = time.perf_counter()
        self.trace_s, self.compile_s, self.first_call_s = t1 - t0, t2 - t1, t3 - t2
        self.xla_flops = None
        try:
            cost = self.compiled.cost_analysis()
            if isinstance(cost, list):
                cost = cost[0]
            self.xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
        except Exception:  # noqa: BLE001 - cost analysis is best effort
            pass
        self.temp_bytes = None
        try:
            self.temp_bytes = int(self.compiled.memory_analysis().temp_size_in_bytes)
        except Exception:  # noqa: BLE001 - memory analysis is best effort
            pass

    def call(self) -> None:
        out = self.compiled(*self.args)
        self.last = out
        if self.donate:
            if len(out) != len(self.donate):
                raise ValueError("a donating case must return one output per donated argument")
            for i, o in zip(self.donate, out, strict=True):
                self.args[i] = o
        _block(out)


def time_calls(
    calls: dict[str, Callable[[], Any]],
    *,
    rounds: int = 15,
    min_sample_s: float = 0.005,
    max_total_s: float = 30.0,
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Interleaved samples of ready-to-run calls (each must block until its result is done).

    The protocol of the module docstring without the compilation: each call is made once to
    calibrate ``inner`` (calls per sample), then ``rounds`` rounds run every call in turn.

    Returns:
      ``(samples, inner)``: name -> list of seconds per call, name -> calls per sample.
    """
    inner, samples = {}, {name: [] for name in calls}
    per_round = 0.0
    for name, call in calls.items():  # calibrate the number of calls per sample
        t0 = time.perf_counter()
        call()
        one = max(time.perf_counter() - t0, 1e-7)
        inner[name] = max(1, min(1000, math.ceil(min_sample_s / one)))
        per_round += inner[name] * one
    rounds = max(3, min(rounds, int(max_total_s / max(per_round, 1e-9))))
    for _ in range(rounds):
        for name, call in calls.items():
            k = inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                call()
            samples[name].append((time.perf_counter() - t0) / k)
    return samples, inner


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """Median, min and quartiles of timing samples (seconds)."""
    s = np.asarray(samples)
    return {
        "median_s": float(np.median(s)),
        "min_s": float(np.min(s)),
        "q25_s": float(np.percentile(s, 25)),
        "q75_s": float(np.percentile(s, 75)),
        "samples": len(s),
    }


def time_cases(
    cases: dict[str, tuple],
    *,
    rounds: int = 15,
    min_sample_s: float = 0.005,
    max_total_s: float = 30.0,
    outputs: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Times several functions side by side (see the module docstring for the protocol).

    Args:
      cases: name -> ``(function, args)`` or ``(function, args, donate_argnums)``; each
        function is jitted. A donating function must return a tuple with one new value per
        donated argument, which replaces it for the next call (a training loop's carry).
      rounds: interleaved samples per case (fewer if ``max_total_s`` runs out, at least 3).
      min_sample_s: a sample repeats the call until it lasts about this long.
      max_total_s: wall-clock budget for the timed rounds of all cases together.
      outputs: if given, filled with each case's last output (e.g. to check accuracy).

    Returns:
      name -> dict with ``median_s``, ``min_s``, ``q25_s``, ``q75_s``, ``samples``, ``inner``,
      ``compile_s``, ``trace_s``, ``first_call_s``, ``xla_flops`` and ``temp_bytes``.
    """
    built = {name: _Case(*spec) for name, spec in cases.items()}
    samples, inner = time_calls(
        {name: c.call for name, c in built.items()},
        rounds=rounds,
        min_sample_s=min_sample_s,
        max_total_s=max_total_s,
    )
    out = {}
    for name, c in built.items():
        if outputs is not None:
            outputs[name] = c.last
        out[name] = {
            **summarize(samples[name]),
            "inner": inner[name],
            "compile_s": c.compile_s,
            "trace_s": c.trace_s,
            "first_call_s": c.first_call_s,
            "xla_flops": c.xla_flops,
            "temp_bytes": c.temp_bytes,
        }
    return out


def tree_bytes(tree: Any) -> int:
    """Total bytes of the arrays (or shape-dtype structs) in ``tree``."""
    return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree)))


def fmt_s(s: float | None) -> str:
    """Seconds as a short human string."""
    if s is None or not np.isfinite(s):
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.0f} us"
    if s < 1.0:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def fmt_bytes(n: float) -> str:
    """Bytes as KiB/MiB/GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} GiB"


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def md_header(title: str, prov: dict[str, Any]) -> str:
    """The provenance block that opens every Markdown result."""
    m = prov["machine"]
    return "\n".join(
        [
            f"# {title}",
            "",
            f"- command: `{prov['command']}`",
            f"- git commit: `{prov['git_commit']}`",
            f"- date (UTC): {prov['utc']}",
            f"- machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), "
            f"{m['platform']}",
            f"- jax {m['jax']} (jaxlib {m['jaxlib']}), backend `{m['backend']}` "
            f"({m['device_kind']} x{len(m['devices'])}), optax {m['optax']}, flax {m['flax']}",
            f"- load average at start: {', '.join(f'{x:.2f}' for x in m['loadavg_start'])}"
            f"; at end: {', '.join(f'{x:.2f}' for x in prov.get('loadavg_end', []))}",
            "",
            "",
        ]
    )


def write_results(name: str, prov: dict[str, Any], data: dict[str, Any], markdown: str) -> Path:
    """Writes ``<name>.json`` and ``<name>.md`` under the results folder."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    prov = dict(prov, loadavg_end=list(os.getloadavg()))
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"provenance": prov, **data}, indent=2, default=_json) + "\n")
    (RESULTS / f"{name}.md").write_text(md_header(name, prov) + markdown.rstrip() + "\n")
    return path


def _json(x: Any) -> Any:
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)
