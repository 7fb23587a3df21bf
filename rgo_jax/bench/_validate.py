"""Checks of the harness's inputs and of its training: every config field's type and range,
and finite losses and states while a run trains.

A config is checked field by field when it is read (a JSON file or :class:`Config`), so a
wrong value is reported with its key before anything runs, never as a library traceback or
a silently converted value (``"checkpoint": "false"`` is not true, ``"hidden": "64"`` is not
widths 6 and 4). While training, the losses of every compiled chunk and the state after
every task are checked for NaN/Inf, so that a diverging run stops with the method, seed,
task and step instead of finishing at chance accuracy with exit code 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MAX_NUM_TASKS",
    "MAX_SEED",
    "NonFiniteError",
    "RunError",
    "check_config",
    "check_fields",
    "check_finite_losses",
    "check_finite_state",
    "config_root",
]

#: Largest ``num_tasks`` accepted: the accuracy matrix alone is ``num_tasks**2`` floats.
MAX_NUM_TASKS = 1000
#: Seeds (and ``fel_seed``) are unsigned 32-bit integers (NumPy and JAX generators).
MAX_SEED = 2**32 - 1


class RunError(ValueError):
    """An error of the run's inputs or state that the command line reports in one line."""


class NonFiniteError(RunError, FloatingPointError):
    """The loss or the state of a run became NaN or infinite."""


def _kind(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _int(key: str, v: Any, lo: int = 1, hi: int | None = None) -> None:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValueError(f"{key} must be an integer, got {v!r} ({_kind(v)}).")
    if v < lo or (hi is not None and v > hi):
        if lo == 1 and hi is None:
            raise ValueError(f"{key} must be a positive integer, got {v!r}.")
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"{key} must be an integer {rng}, got {v}.")


def _real(key: str, v: Any, *, lo: float = 0.0, lo_open: bool = True, hi: float | None = None):
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ValueError(f"{key} must be a number, got {v!r} ({_kind(v)}).")
    if not math.isfinite(v):
        raise ValueError(f"{key} must be finite, got {v!r}.")
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        if lo == 0.0 and lo_open and hi is None:
            raise ValueError(f"{key} must be positive, got {v!r}.")
        low = f"> {lo:g}" if lo_open else f">= {lo:g}"
        raise ValueError(
            f"{key} must be {low}{'' if hi is None else f' and <= {hi:g}'}, got {v!r}."
        )


def _bool(key: str, v: Any) -> None:
    if not isinstance(v, (bool, np.bool_)):
        raise ValueError(f"{key} must be true or false, got {v!r} ({_kind(v)}).")


def _str(key: str, v: Any) -> None:
    if not isinstance(v, str):
        raise ValueError(f"{key} must be a string, got {v!r} ({_kind(v)}).")


def _seq(key: str, v: Any, item, *, unique: bool) -> None:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)):
        raise ValueError(f"{key} must be a list, got {v!r} ({_kind(v)}).")
    if not v:
        raise ValueError(f"{key} is empty.")
    for i, x in enumerate(v):
        item(f"{key}[{i}]", x)
    if unique:
        seen = set()
        for x in v:
            if x in seen:
                raise ValueError(f"{key} lists {x!r} twice.")
            seen.add(x)


def _optional(check):
    def run(key, v):
        if v is not None:
            check(key, v)

    return run


def _count(key: str, v: Any) -> None:
    # ``--option KEY=VALUE`` reads numbers as floats: 256.0 is a count, 2.5 is not.
    if isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
        v = int(v)
    _int(key, v)


def _seed(key: str, v: Any) -> None:
    _int(key, v, 0, MAX_SEED)


#: One check per :class:`rgo_jax.bench.train.Config` field (membership of names such as
#: ``benchmark`` and ``init`` is checked by ``Config`` itself).
_FIELDS = {
    "benchmark": _str,
    "dataset": _optional(_str),
    "stream": _optional(_str),
    "classes_per_task": _optional(_int),
    "methods": lambda k, v: _seq(k, v, _str, unique=True),
    "model": _str,
    "hidden": _optional(lambda k, v: _seq(k, v, _int, unique=False)),
    "width": _optional(_int),
    "init": _str,
    "init_scale": _real,
    "bias": _bool,
    "normalize": _optional(lambda k, v: _mean_std(k, v)),
    "num_tasks": lambda k, v: _int(k, v, 1, MAX_NUM_TASKS),
    "steps_per_task": _int,
    "batch_size": _int,
    "learning_rate": _real,
    "alpha": _real,
    "consolidation_batches": _int,
    "rls_method": _str,
    "seeds": lambda k, v: _seq(k, v, _seed, unique=True),
    "data_dir": _optional(_str),
    "max_train_per_task": _optional(_int),
    "max_test_per_task": _optional(_int),
    "subsample": _str,
    "validation_fraction": lambda k, v: _real(k, v, lo=0.0, lo_open=False),
    "first_task_identity": _bool,
    "fel_seed": _seed,
    "head": _str,
    "vmap_seeds": _bool,
    "vmap_memory_gb": _real,
    "eval_batch_size": _int,
    "chunk_steps": _int,
    "scan_unroll": _int,
    "vector_chunk": _int,
    "input_projection": _bool,
    "checkpoint": _bool,
    "keep_checkpoints": _bool,
    "plots": _bool,
    "method_options": lambda k, v: _method_options(k, v),
}


def _mean_std(key: str, v: Any) -> None:
    if isinstance(v, (str, bytes)) or not isinstance(v, (list, tuple)) or len(v) != 2:
        raise ValueError(f"{key} must be a pair [mean, std], got {v!r} ({_kind(v)}).")
    _real(f"{key}[0] (mean)", v[0], lo=-math.inf, lo_open=False)
    _real(f"{key}[1] (std)", v[1])


def _thresholds(key: str, v: Any) -> None:
    """GPM's energy threshold: a number in (0, 1], or a list of them (one per layer)."""
    if isinstance(v, (list, tuple)):
        _seq(key, v, lambda k, x: _real(k, x, lo=0.0, hi=1.0), unique=False)
    else:
        _real(key, v, lo=0.0, hi=1.0)


#: Ranges of the numeric method options (their names and kinds are checked by
#: :func:`rgo_jax.bench._methods.check_method_options`).
_OPTION_RANGES = {
    "ewc_lambda": lambda k, v: _real(k, v, lo=0.0, lo_open=False),
    "ewc_gamma": lambda k, v: _real(k, v, lo=0.0, lo_open=False, hi=1.0),
    "ewc_samples": _count,
    "owm_alpha": _real,
    "gpm_threshold": _thresholds,
    "gpm_threshold_step": lambda k, v: _real(k, v, lo=0.0, lo_open=False, hi=1.0),
    "gpm_samples": _count,
    "agem_per_task": _count,
    "agem_batch": _count,
}


def _method_options(key: str, v: Any) -> None:
    if not isinstance(v, Mapping):
        raise ValueError(f"{key} must be an object of option: value, got {v!r} ({_kind(v)}).")
    for name, value in v.items():
        check = _OPTION_RANGES.get(name)
        if check is not None and not isinstance(value, str):
            check(f"{key}.{name}", value)


def config_root(fields: Any, path: str | Path) -> dict:
    """The fields of a JSON config file, which must be an object.

    Raises:
      ValueError: naming the file when its root is not a JSON object.
    """
    if not isinstance(fields, dict):
        raise ValueError(
            f"config file {path} must hold a JSON object of Config fields, got a "
            f"{_kind(fields) if not isinstance(fields, list) else 'list'}."
        )
    return fields


def check_fields(fields: Mapping[str, Any]) -> None:
    """Checks the type and range of every known field in ``fields`` (unknown keys are
    left to the caller).

    Args:
      fields: Config field name -> value, as read from JSON (lists) or given in Python
        (tuples).

    Raises:
      ValueError: naming the key, the expected type or range, and the value given.

    Examples:
      >>> check_fields({"learning_rate": 0.1, "seeds": [0, 1]})
      >>> check_fields({"learning_rate": "0.1"})
      Traceback (most recent call last):
      ...
      ValueError: learning_rate must be a number, got '0.1' (str).
    """
    for key, value in fields.items():
        check = _FIELDS.get(key)
        if check is not None:
            check(key, value)


def check_config(cfg: Any) -> None:
    """:func:`check_fields` over every field of a dataclass config."""

    check_fields({f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


# ------------------------------------------------------------------------------------------
# Training


def _seed_label(seeds: Sequence[int]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {','.join(map(str, seeds))}"


def check_finite_losses(losses: Any, method: str, seeds: Sequence[int], task: int, step0: int):
    """Raises :class:`NonFiniteError` if a loss of a chunk ``[seeds, steps]`` is NaN/Inf.

    Called once per compiled chunk (one small device-to-host copy), not per step.

    Args:
      losses: the chunk's losses, ``[len(seeds), steps]``.
      method, seeds, task: what ran (for the message).
      step0: the step (within the task) of the chunk's first loss.

    Examples:
      >>> import numpy as np
      >>> check_finite_losses(np.array([[0.5, 0.4]]), "sgd", (0,), 2, 100)  # finite: silent
      >>> check_finite_losses(np.array([[0.5, np.nan]]), "sgd", (0,), 2, 100)
      Traceback (most recent call last):
      ...
      rgo_jax.bench._validate.NonFiniteError: method sgd, seed 0, task 2, step 101: ...
    """
    values = np.asarray(losses)
    bad = ~np.isfinite(values)
    if not bad.any():
        return
    lane, step = np.argwhere(bad)[0]
    raise NonFiniteError(
        f"method {method}, seed {seeds[lane]}, task {task}, step {step0 + int(step)}: the "
        f"training loss is {values[lane, step]} (diverged). Lower learning_rate, or check "
        "alpha and init_scale."
    )


@jax.jit
def _all_finite(tree) -> jax.Array:
    leaves = [
        jnp.all(jnp.isfinite(x))
        for x in jax.tree.leaves(tree)
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)
    ]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def check_finite_state(
    state: Any, method: str, seed: int, task: int, what: str = "training state"
) -> None:
    """Raises :class:`NonFiniteError` naming the first non-finite leaf of ``state``.

    Called once per task, after its consolidation and before its checkpoint (so a NaN P is
    never written); one fused reduction on the device.

    Args:
      state: a pytree (parameters, optimizer state with RGO's P matrices...).
      method, seed, task: what ran (for the message).
      what: the state's name in the message.
    """
    if bool(_all_finite(state)):
        return
    for path, x in jax.tree_util.tree_leaves_with_path(state):
        x = np.asarray(x)
        if np.issubdtype(x.dtype, np.inexact) and not np.isfinite(x).all():
            raise NonFiniteError(
                f"method {method}, seed {seed}, task {task} (end of task): the {what} leaf "
                f"{jax.tree_util.keystr(path)} {x.shape} holds "
                f"{int((~np.isfinite(x)).sum())} non-finite values. Check alpha (the RLS "
                "regulariser), learning_rate and init_scale."
            )
