"""Shared test helpers: float64 references and small random problems."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
"""The repository root."""
SHARED = REPO.parent / "shared"
"""The shared folder beside the repository (data sets, tools)."""
SHARED_DATA = SHARED / "datasets"


def closed_form_p(vectors: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha (alpha I + sum v v^T)^-1`` in float64 for ``vectors [n, d]``."""
    v = np.asarray(vectors, np.float64)
    d = v.shape[-1]
    return alpha * np.linalg.inv(alpha * np.eye(d) + v.T @ v)


def random_vectors(rng: np.random.Generator, n: int, d: int, scale: float = 1.0) -> np.ndarray:
    """Correlated, non-negative-ish vectors, like layer inputs (not isotropic noise)."""
    basis = rng.normal(size=(max(2, d // 3), d))
    coef = np.abs(rng.normal(size=(n, basis.shape[0])))
    return (scale * (coef @ basis) / np.sqrt(d)).astype(np.float32)


def task_context(cfg, stream, net, rng: int = 0):
    """The harness's :class:`TaskContext` for task 0 of ``stream`` under ``cfg``."""
    from rgo_jax.bench import _methods  # noqa: PLC0415 - the core's tests never load it

    x, y = stream.get_split(0, "train")
    return _methods.TaskContext(
        task=0,
        x_train=x,
        y_train=y,
        class_mask=stream.class_masks()[0],
        logits_fn=net.logits,
        inputs_fn=net.inputs,
        rng=np.random.default_rng(rng),
        run=cfg.run_info(),
    )
