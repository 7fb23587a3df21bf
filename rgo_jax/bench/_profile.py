"""Where a harness run's time goes, and JAX's persistent compilation cache for the CLI.

The training loop marks its phases with one-line :func:`lap` calls (a lap ends the previous
phase and starts the next, so the hooks need no re-indented blocks); while a profile is
active (:func:`start`), XLA compilations are recorded per function through
``jax.monitoring``. :func:`finish` returns the breakdown: import, every phase per task
(setup, data, train, task boundary i.e. consolidation / Fisher / bases, evaluation,
checkpoint, report), and each jitted function's compile count and time, with the share of
compilation inside each phase (and, in ``profile.json``, the functions compiled in each).
A compilation in a background thread (the harness compiles the first task boundary's
work while the task trains) counts in the phase during which it ends. Checkpoints and
reports are written by a background thread too: their phases time only the hand-off.
Without an active profile every hook is a no-op.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import jax

__all__ = ["compilation_cache_dir", "enable_compilation_cache", "finish", "lap", "start"]

CACHE_ENV = "RGO_JAX_COMPILATION_CACHE"
"""Environment variable: the cache folder, or ``off`` (also ``0``, ``none``) to disable it."""

_OFF = ("off", "0", "none", "false", "")


def compilation_cache_dir(flag: str | None = None) -> Path | None:
    """The persistent compilation cache folder for the CLI, or ``None`` when disabled.

    Order: the ``--compilation-cache`` flag, then ``$RGO_JAX_COMPILATION_CACHE``, then the
    default ``~/.cache/rgo_jax/jax_compilation_cache``. ``off`` disables it.

    Examples:
      >>> compilation_cache_dir("off") is None
      True
      >>> str(compilation_cache_dir("/tmp/cc"))
      '/tmp/cc'
    """
    value = flag if flag is not None else os.environ.get(CACHE_ENV)
    if value is None:
        return Path.home() / ".cache" / "rgo_jax" / "jax_compilation_cache"
    if value.strip().lower() in _OFF:
        return None
    return Path(value).expanduser()


def enable_compilation_cache(path: Path | None) -> None:
    """Points JAX's persistent compilation cache at ``path`` (every compilation cached).

    A warm cache turns each XLA compilation of a later run into a file read; the compiled
    code, and so every result, is the same.
    """
    if path is None:
        return
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _process_age_s() -> float | None:
    """Seconds since this process started (Linux ``/proc``), or ``None``."""
    try:
        start_ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - start_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_TRACE_EVENTS = (
    "/jax/core/compile/jaxpr_trace_duration",
    "/jax/core/compile/jaxpr_to_mlir_module_duration",
)


class _Profile:
    def __init__(self) -> None:
        self.import_s = _process_age_s()
        self.t0 = time.perf_counter()
        self.phase: tuple[int | None, str] = (None, "start (config, seed groups)")
        self.since = self.t0
        self.phases: dict[tuple[int | None, str], float] = defaultdict(float)
        self.phase_compile: dict[tuple[int | None, str], float] = defaultdict(float)
        self.phase_compiled: dict[tuple[int | None, str], list[str]] = defaultdict(list)
        self.compiles: dict[str, list] = defaultdict(lambda: [0, 0.0])
        self.trace_s = 0.0

    def listener(self, event: str, duration: float, **kwargs: Any) -> None:
        if event == _COMPILE_EVENT:
            name = str(kwargs.get("fun_name", "?"))
            entry = self.compiles[name]
            entry[0] += 1
            entry[1] += duration
            self.phase_compile[self.phase] += duration
            self.phase_compiled[self.phase].append(name)
        elif event in _TRACE_EVENTS:
            self.trace_s += duration

    def lap(self, name: str, task: int | None) -> None:
        now = time.perf_counter()
        self.phases[self.phase] += now - self.since
        self.phase, self.since = (task, name), now

    def table(self) -> dict[str, Any]:
        self.lap("end", None)
        wall = time.perf_counter() - self.t0
        phases = [
            {
                "task": t,
                "phase": n,
                "seconds": s,
                "compile_seconds": self.phase_compile.get((t, n), 0.0),
                "compiled": list(self.phase_compiled.get((t, n), [])),
            }
            for (t, n), s in self.phases.items()
        ]
        compiles = sorted(
            ({"function": f, "count": c, "seconds": s} for f, (c, s) in self.compiles.items()),
            key=lambda r: -r["seconds"],
        )
        return {
            "import_seconds": self.import_s,
            "wall_seconds": wall,
            "trace_and_lower_seconds": self.trace_s,
            "phases": phases,
            "compiles": compiles,
        }


_ACTIVE: _Profile | None = None


def start() -> None:
    """Starts recording phases and compilations (call before any jitted work)."""
    global _ACTIVE
    _ACTIVE = _Profile()
    jax.monitoring.register_event_duration_secs_listener(_ACTIVE.listener)


def lap(name: str, task: int | None = None) -> None:
    """Ends the current phase and starts ``name`` (of ``task``); a no-op without a profile."""
    if _ACTIVE is not None:
        _ACTIVE.lap(name, task)


def finish(out_dir: str | Path | None = None) -> str:
    """Stops the profile; returns the breakdown as text (and writes ``profile.json``)."""
    global _ACTIVE
    prof, _ACTIVE = _ACTIVE, None
    if prof is None:
        return ""
    try:
        jax.monitoring.unregister_event_duration_listener(prof.listener)
    except (AttributeError, ValueError, AssertionError):
        pass
    data = prof.table()
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / "profile.json").write_text(json.dumps(data, indent=2) + "\n")
    return format_profile(data)


def format_profile(data: dict[str, Any]) -> str:
    """The text breakdown of :func:`finish`'s data: phases by task, then by phase, compiles."""
    lines = ["", "Cost breakdown (s)"]
    imp = data["import_seconds"]
    total_compile = sum(c["seconds"] for c in data["compiles"])
    lines.append(
        f"  process start -> main (interpreter, imports): "
        f"{'?' if imp is None else f'{imp:.2f}'}; main -> end: {data['wall_seconds']:.2f}; "
        f"XLA compilation {total_compile:.2f} over "
        f"{sum(c['count'] for c in data['compiles'])} compiles, tracing/lowering "
        f"{data['trace_and_lower_seconds']:.2f}"
    )
    by_phase: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    lines.append(f"  {'task':>5s}  {'phase':24s} {'seconds':>8s} {'of it compile':>14s}")
    for p in data["phases"]:
        if p["seconds"] < 5e-4 and p["compile_seconds"] == 0:
            continue
        task = "-" if p["task"] is None else str(p["task"])
        lines.append(
            f"  {task:>5s}  {p['phase']:24s} {p['seconds']:8.2f} {p['compile_seconds']:14.2f}"
        )
        by_phase[p["phase"]][0] += p["seconds"]
        by_phase[p["phase"]][1] += p["compile_seconds"]
    lines.append("  all tasks:")
    for name, (s, c) in sorted(by_phase.items(), key=lambda kv: -kv[1][0]):
        lines.append(f"  {'':>5s}  {name:24s} {s:8.2f} {c:14.2f}")
    lines.append("  compiles (function: count, seconds), slowest first:")
    for c in data["compiles"][:15]:
        lines.append(f"    {c['function'][:60]:60s} {c['count']:4d} {c['seconds']:7.2f}")
    if len(data["compiles"]) > 15:
        rest = data["compiles"][15:]
        lines.append(
            f"    ... {len(rest)} more functions: {sum(c['count'] for c in rest)} compiles, "
            f"{sum(c['seconds'] for c in rest):.2f} s"
        )
    return "\n".join(lines)
