"""Continual-learning metrics derived from the accuracy matrix (pure numpy).

The primary record of a continual-learning run is the accuracy matrix ``R`` of shape
``[T, T]``: ``R[i, j]`` is the test accuracy (a fraction in ``[0, 1]``) on task ``j`` after
training through task ``i``. Entries above the diagonal (``j > i``) are the zero-shot
accuracies on tasks not yet trained; they are needed only for forward transfer and may be
``nan`` (not measured). Entries on and below the diagonal must be finite.

Every metric is computed from ``R`` alone (plus, for FWT, the accuracies of a randomly
initialised network):

====================  =====================================================================
``average_accuracy``  ACC = mean_j R[T-1, j]  (final average accuracy)
``backward_transfer`` BWT = sum_{j<T-1} (R[T-1, j] - R[j, j]) / (T-1)   (or / T, GEM's code)
``forgetting``        F = mean_{j<T-1} max_{j<=i<T-1} R[i, j] - R[T-1, j]  (Chaudhry 2018)
``forward_transfer``  FWT = sum_{j>=1} (R[j-1, j] - b_j) / (T-1)       (or / T, GEM's code)
``learning_accuracy`` LA = mean_j R[j, j]  (accuracy on each task just after learning it)
====================  =====================================================================

With one task, BWT, forgetting and FWT have no terms; they are returned as ``nan``
(undefined), never raised as errors, so that a run can be summarised after its first task.

BWT divisor conventions: the GEM paper (Lopez-Paz & Ranzato, 2017) writes BWT and FWT as
averages over their ``T - 1`` terms; GPM, Mammoth and Avalanche also divide by ``T - 1``.
GEM's released code (``metrics.py``) instead takes the mean of a length-``T`` vector whose
last BWT term (and first FWT term) is zero, i.e. it divides by ``T``. ``divisor="T"``
reproduces that code; its values are ``(T - 1) / T`` times the default ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "average_accuracy",
    "average_accuracy_curve",
    "backward_transfer",
    "check_accuracy_matrix",
    "forgetting",
    "forward_transfer",
    "learning_accuracy",
    "summarize",
    "summarize_seeds",
]

Divisor = Literal["T-1", "T"]

#: Metric keys of :func:`summarize`, in reporting order.
METRIC_KEYS = ("acc", "bwt", "forgetting", "learning_accuracy", "fwt")


def check_accuracy_matrix(R: Any, *, name: str = "R") -> np.ndarray:
    """Validates an accuracy matrix and returns it as a float64 numpy array.

    Args:
      R: array-like ``[T, T]``, ``R[i, j]`` = accuracy on task ``j`` after training task ``i``,
        fractions in ``[0, 1]``. ``nan`` is allowed strictly above the diagonal only (a
        zero-shot accuracy that was not measured).
      name: how the matrix is called in error messages.

    Returns:
      A new ``float64`` array of shape ``[T, T]``.

    Raises:
      TypeError: if ``R`` is not numeric.
      ValueError: naming the problem (shape, offending cell, range).

    Examples:
      >>> check_accuracy_matrix([[0.9, float("nan")], [0.8, 0.95]]).shape
      (2, 2)
      >>> check_accuracy_matrix([[90.0]])
      Traceback (most recent call last):
      ...
      ValueError: R[0, 0] = 90 is outside [0, 1]; ... divide by 100).
    """
    try:
        arr = np.array(R, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a numeric [T, T] array of accuracies, got {type(R).__name__}: {err}"
        ) from None
    if arr.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [T, T] array, got shape {arr.shape}.")
    rows, cols = arr.shape
    if rows != cols:
        raise ValueError(
            f"{name} must be square [T, T] (row i = after training task i, column j = "
            f"task j), got shape {arr.shape}. For a partial run pass the leading "
            f"[k+1, k+1] block R[:k+1, :k+1]."
        )
    if rows == 0:
        raise ValueError(f"{name} must hold at least one task, got shape {arr.shape}.")
    lower = np.tril(np.ones_like(arr, dtype=bool))
    bad = ~np.isfinite(arr) & (lower | np.isinf(arr))
    if bad.any():
        i, j = (int(k) for k in np.argwhere(bad)[0])
        if j <= i:
            why = "entries on or below the diagonal must be measured accuracies"
        else:
            why = "above the diagonal only nan (not measured) is allowed"
        raise ValueError(f"{name}[{i}, {j}] = {arr[i, j]} is not finite; {why}.")
    finite = np.isfinite(arr)
    out_of_range = finite & ((arr < 0.0) | (arr > 1.0))
    if out_of_range.any():
        i, j = (int(k) for k in np.argwhere(out_of_range)[0])
        hint = " (were percentages passed? divide by 100)" if np.nanmax(arr) > 1.0 else ""
        raise ValueError(
            f"{name}[{i}, {j}] = {arr[i, j]:g} is outside [0, 1]; accuracies are fractions{hint}."
        )
    return arr


def _check_divisor(divisor: str) -> None:
    if divisor not in ("T-1", "T"):
        raise ValueError(f'divisor must be "T-1" or "T" (GEM\'s code), got {divisor!r}.')


def average_accuracy(R: Any) -> float:
    """Final average accuracy ACC = mean_j R[T-1, j] over all ``T`` tasks.

    Examples:
      >>> average_accuracy([[0.75, 0.25], [0.5, 0.875]])  # (0.5 + 0.875) / 2
      0.6875
    """
    arr = check_accuracy_matrix(R)
    return float(np.mean(arr[-1]))


def average_accuracy_curve(R: Any) -> np.ndarray:
    """Average accuracy over the tasks seen so far, after each task: ``[T]``.

    Entry ``i`` is ``mean_{j<=i} R[i, j]``; the last entry is :func:`average_accuracy`.

    Examples:
      >>> average_accuracy_curve([[0.75, 0.25], [0.5, 0.875]]).tolist()
      [0.75, 0.6875]
    """
    arr = check_accuracy_matrix(R)
    seen = np.tril(np.ones_like(arr, dtype=bool))
    return np.where(seen, arr, 0.0).sum(axis=1) / np.arange(1, arr.shape[0] + 1)


def learning_accuracy(R: Any) -> float:
    """Learning accuracy LA = mean_j R[j, j], the accuracy on each task just after learning it.

    Examples:
      >>> learning_accuracy([[0.75, 0.25], [0.5, 0.875]])  # (0.75 + 0.875) / 2
      0.8125
    """
    arr = check_accuracy_matrix(R)
    return float(np.mean(np.diag(arr)))


def backward_transfer(R: Any, *, divisor: Divisor = "T-1") -> float:
    """Backward transfer BWT = sum_{j<T-1} (R[T-1, j] - R[j, j]) / (T-1).

    Negative BWT is forgetting; positive BWT means later tasks improved earlier ones.

    Args:
      R: accuracy matrix ``[T, T]``.
      divisor: ``"T-1"`` (default; GEM paper, GPM, Mammoth, Avalanche: the mean of the
        ``T - 1`` terms) or ``"T"`` (GEM's released code, which averages a length-``T`` vector
        whose last entry is zero).

    Returns:
      BWT as a fraction; ``nan`` when ``T == 1`` (no earlier task to measure).

    Examples:
      >>> backward_transfer([[0.75, 0.25], [0.5, 0.875]])  # (0.5 - 0.75) / 1
      -0.25
      >>> backward_transfer([[0.75, 0.25], [0.5, 0.875]], divisor="T")  # (0.5 - 0.75) / 2
      -0.125
    """
    _check_divisor(divisor)
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return float("nan")
    total = float(np.sum(arr[-1, :-1] - np.diag(arr)[:-1]))
    return total / (T - 1 if divisor == "T-1" else T)


def forgetting(R: Any) -> float:
    """Average forgetting (Chaudhry et al., 2018): how far each old task fell from its best.

    F = mean_{j<T-1} ( max_{j<=i<T-1} R[i, j] - R[T-1, j] ). The maximum runs over the rows
    after task ``j`` was learned and before the last task: entries above the diagonal
    (zero-shot accuracy before task ``j`` was trained) are excluded, and so is the final row,
    so a task that improved at the end has negative forgetting. (Mammoth takes the maximum
    over all rows including the last, which clips each term at zero.)

    Returns:
      Forgetting as a fraction (positive = forgotten); ``nan`` when ``T == 1`` (no old task).

    Examples:
      >>> forgetting([[0.75, 0.25], [0.5, 0.875]])  # 0.75 - 0.5
      0.25
    """
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    if T == 1:
        return float("nan")
    learned = np.tril(np.ones((T - 1, T - 1), dtype=bool))  # row i >= column j
    best = np.where(learned, arr[:-1, :-1], -np.inf).max(axis=0)
    return float(np.mean(best - arr[-1, :-1]))


def _check_random_init(random_init: Any, T: int, *, name: str = "random_init") -> np.ndarray:
    try:
        b = np.array(random_init, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a numeric vector of T accuracies: {err}") from None
    if b.shape != (T,):
        raise ValueError(
            f"{name} must have shape ({T},) (accuracy of a randomly initialised network on "
            f"each of the T = {T} tasks), got shape {b.shape}."
        )
    if not np.isfinite(b).all() or (b < 0).any() or (b > 1).any():
        k = int(np.argmax(~np.isfinite(b) | (b < 0) | (b > 1)))
        raise ValueError(f"{name}[{k}] = {b[k]:g} must be a finite accuracy in [0, 1].")
    return b


def forward_transfer(R: Any, random_init: Any, *, divisor: Divisor = "T-1") -> float:
    """Forward transfer (GEM): FWT = sum_{j>=1} (R[j-1, j] - b_j) / (T-1).

    ``R[j-1, j]`` is the zero-shot accuracy on task ``j`` just before training it, ``b_j``
    the accuracy of a randomly initialised network on task ``j`` (Lopez-Paz & Ranzato, 2017).

    Args:
      R: accuracy matrix ``[T, T]``; the first super-diagonal must be measured (not ``nan``).
      random_init: ``[T]`` accuracies of the randomly initialised network (``b_0`` unused).
      divisor: ``"T-1"`` (default, GEM paper, Mammoth) or ``"T"`` (GEM's released code).

    Returns:
      FWT as a fraction; ``nan`` when ``T == 1`` (no future task).

    Examples:
      >>> forward_transfer([[0.75, 0.25], [0.5, 0.875]], [0.125, 0.125])  # 0.25 - 0.125
      0.125
    """
    _check_divisor(divisor)
    arr = check_accuracy_matrix(R)
    T = arr.shape[0]
    b = _check_random_init(random_init, T)
    if T == 1:
        return float("nan")
    zero_shot = np.diag(arr, k=1)
    if np.isnan(zero_shot).any():
        j = int(np.argmax(np.isnan(zero_shot))) + 1
        raise ValueError(
            f"forward_transfer needs R[j-1, j] for every j >= 1 (zero-shot accuracy on task j "
            f"before training it), but R[{j - 1}, {j}] is nan (not measured)."
        )
    total = float(np.sum(zero_shot - b[1:]))
    return total / (T - 1 if divisor == "T-1" else T)


def summarize(R: Any, random_init: Any = None, *, bwt_divisor: Divisor = "T-1") -> dict[str, Any]:
    """All metrics of one accuracy matrix.

    Args:
      R: accuracy matrix ``[T, T]``.
      random_init: optional ``[T]`` accuracies of a randomly initialised network; when given,
        ``"fwt"`` is included (with the same divisor as BWT).
      bwt_divisor: ``"T-1"`` or ``"T"``, see :func:`backward_transfer`.

    Returns:
      ``{"acc", "bwt", "forgetting", "learning_accuracy"[, "fwt"]}`` as float fractions
      (``nan`` where undefined), plus ``"num_tasks"`` (int) and ``"bwt_divisor"`` (str).

    Examples:
      >>> s = summarize([[0.75, 0.25], [0.5, 0.875]])
      >>> s["acc"], s["bwt"], s["num_tasks"], s["bwt_divisor"]
      (0.6875, -0.25, 2, 'T-1')
    """
    arr = check_accuracy_matrix(R)
    out: dict[str, Any] = {
        "acc": average_accuracy(arr),
        "bwt": backward_transfer(arr, divisor=bwt_divisor),
        "forgetting": forgetting(arr),
        "learning_accuracy": learning_accuracy(arr),
    }
    if random_init is not None:
        out["fwt"] = forward_transfer(arr, random_init, divisor=bwt_divisor)
    out["num_tasks"] = int(arr.shape[0])
    out["bwt_divisor"] = bwt_divisor
    return out


def _per_seed_random_init(random_init: Any, num_seeds: int) -> list[Any]:
    """One random-init vector per seed: a shared ``[T]`` vector or ``[S, T]`` rows."""
    if random_init is None:
        return [None] * num_seeds
    try:
        b = np.array(random_init, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"random_init must be numeric ([T] or [S, T]): {err}") from None
    if b.ndim == 1:
        return [b] * num_seeds
    if b.ndim == 2 and b.shape[0] == num_seeds:
        return list(b)
    raise ValueError(
        f"random_init must be [T] (shared by all seeds) or [S, T] with S = {num_seeds} seeds, "
        f"got shape {b.shape}."
    )


def summarize_seeds(
    matrices: Sequence[Any],
    random_init: Any = None,
    *,
    bwt_divisor: Divisor = "T-1",
    ddof: int = 0,
) -> dict[str, Any]:
    """Mean and standard deviation of every metric over seeds, and the mean matrix.

    Args:
      matrices: one ``[T, T]`` accuracy matrix per seed, all the same shape.
      random_init: optional ``[T]`` (shared) or ``[S, T]`` (one row per seed) accuracies of
        randomly initialised networks; when given, FWT is included.
      bwt_divisor: ``"T-1"`` or ``"T"``, see :func:`backward_transfer`.
      ddof: delta degrees of freedom of the standard deviation. The default ``0`` is the
        population std (``np.std``'s default, as most continual-learning papers report);
        ``1`` gives the sample std. With fewer than ``ddof + 1`` seeds the std is ``nan``.

    Returns:
      ``{metric: {"mean", "std", "per_seed"}}`` for each metric of :func:`summarize` (``nan``
      entries propagate: with ``T == 1`` BWT and forgetting are ``nan``), plus
      ``"mean_matrix"`` and ``"std_matrix"`` (``[T, T]`` arrays; a cell is ``nan`` if any seed
      did not measure it), ``"num_seeds"``, ``"num_tasks"``, ``"bwt_divisor"``, ``"std_ddof"``.

    Examples:
      >>> s = summarize_seeds([[[0.75, 0.25], [0.5, 0.875]], [[0.75, 0.25], [0.25, 0.875]]])
      >>> s["acc"]["per_seed"], s["acc"]["mean"], s["acc"]["std"]
      ([0.6875, 0.5625], 0.625, 0.0625)
    """
    if isinstance(matrices, np.ndarray) and matrices.ndim == 3:
        matrices = list(matrices)
    if isinstance(matrices, (str, bytes)) or not isinstance(matrices, Sequence):
        raise TypeError(
            f"matrices must be a sequence of [T, T] accuracy matrices (one per seed), got "
            f"{type(matrices).__name__}."
        )
    if len(matrices) == 0:
        raise ValueError("matrices is empty: summarize_seeds needs at least one seed.")
    if not isinstance(ddof, (int, np.integer)) or ddof < 0:
        raise ValueError(f"ddof must be a non-negative integer, got {ddof!r}.")
    mats = [check_accuracy_matrix(m, name=f"matrices[{s}]") for s, m in enumerate(matrices)]
    shapes = {m.shape for m in mats}
    if len(shapes) != 1:
        detail = ", ".join(f"seed {s}: {m.shape}" for s, m in enumerate(mats))
        raise ValueError(f"all seeds must have the same [T, T] shape, got {detail}.")
    inits = _per_seed_random_init(random_init, len(mats))
    per_seed = [summarize(m, b, bwt_divisor=bwt_divisor) for m, b in zip(mats, inits, strict=True)]
    n = len(mats)
    out: dict[str, Any] = {}
    for key in METRIC_KEYS:
        if key not in per_seed[0]:
            continue
        values = np.array([s[key] for s in per_seed], dtype=np.float64)
        std = float(np.std(values, ddof=ddof)) if n > ddof else float("nan")
        out[key] = {"mean": float(np.mean(values)), "std": std, "per_seed": values.tolist()}
    stack = np.stack(mats)
    out["mean_matrix"] = stack.mean(axis=0)
    out["std_matrix"] = stack.std(axis=0, ddof=ddof) if n > ddof else np.full_like(mats[0], np.nan)
    out["num_seeds"] = n
    out["num_tasks"] = int(mats[0].shape[0])
    out["bwt_divisor"] = bwt_divisor
    out["std_ddof"] = int(ddof)
    return out
