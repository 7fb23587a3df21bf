"""Shared test helpers: float64 references and small random problems."""

from __future__ import annotations

import contextlib
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


def built_in_one_program(make):
    """The module ``make()`` returns, its variables created by one compiled program.

    Eagerly, every initialiser and shape compiles a small program of its own; traced
    together they compile once (the same module structure, variables from the same keys).
    """
    import jax  # noqa: PLC0415 - the helpers above need NumPy only
    from flax import nnx  # noqa: PLC0415

    graphs = []

    def state():
        graph, variables = nnx.split(make())
        graphs.append(graph)
        return variables

    # A one-off program: LLVM optimisation level 1 compiles it 2-4x faster (as build_model).
    variables = jax.jit(state, compiler_options={"xla_backend_optimization_level": 1})()
    return nnx.merge(graphs[0], variables)


@contextlib.contextmanager
def no_persistent_compilation_cache():
    """Every XLA compilation inside really compiles (for tests that count them).

    The suite's processes share a persistent compilation cache (see ``conftest.py``); a
    program read back from it is not compiled and so not counted.
    """
    import jax  # noqa: PLC0415
    from jax.experimental.compilation_cache import compilation_cache  # noqa: PLC0415

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()  # JAX decides once whether to use it: ask again
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()
