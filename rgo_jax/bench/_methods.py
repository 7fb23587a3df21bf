"""Continual-learning methods as small strategy objects used by :mod:`rgo_jax.bench.train`.

A method chooses the optimizer, whether the network has FEL sites, and what happens at a
task boundary (RGO's consolidation pass, EWC's Fisher, GPM's bases...). The training loop
itself (compiled steps, evaluation, checkpoints) is shared by all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgo_jax import _transform
from rgo_jax._curvature import curvature_vectors
from rgo_jax.bench import models

__all__ = ["METHODS", "Method", "TaskContext", "get_method"]


@dataclasses.dataclass
class TaskContext:
    """What a method sees at the end of task ``task``."""

    task: int
    x_train: np.ndarray
    y_train: np.ndarray
    class_mask: np.ndarray
    logits_fn: Callable[[Any, jax.Array, Any], jax.Array]  # (params, x, task) -> logits
    inputs_fn: Callable[[Any, jax.Array, Any], dict] | None  # (params, x, task) -> layer inputs
    rng: np.random.Generator
    config: Any
    curvature_logits_fn: Callable[[Any, jax.Array, Any], jax.Array] | None = None
    """``logits_fn`` whose kernel cotangents come pre-averaged over the output axes
    (:func:`rgo_jax.nnx.use_reduced_kernel_gradients`): for curvature vectors
    only, which it gives exactly and much faster. ``None``: use ``logits_fn``."""


@dataclasses.dataclass(frozen=True)
class Method:
    """A continual-learning method: its optimizer and its task-boundary work.

    Attributes:
      name: registry name.
      fel: whether the network gets its FEL sites.
      fresh_network_per_task: single-task learning (STL): a new network for every task.
      joint: train on the union of all tasks seen so far (multi-task upper bound).
      uses_memory: stores and replays past data (reported in results).
      input_projectable: its optimizer is RGO, whose dense kernels can be projected on the
        input side (``Config.input_projection``).
      description: one line for ``--help`` and the results.
      make_tx: ``cfg -> optax transformation``.
      init_extra: ``(params, cfg, stream) -> pytree`` of method state kept outside the
        optimizer (``stream`` gives ``input_shape`` and ``num_classes``).
      penalty: ``(params, extra, cfg) -> scalar`` added to the loss (EWC).
      step_kwargs: ``(net, params, x, task, cfg, extra, step) -> dict`` of extra arguments
        for ``tx.update`` at every step (OWM's layer inputs, A-GEM's reference gradient),
        traced inside the step; ``step`` is the int32 step number within the task.
      after_task: ``(ctx, params, opt_state, extra) -> (opt_state, extra)``.
    """

    name: str
    description: str
    fel: bool = False
    fresh_network_per_task: bool = False
    joint: bool = False
    uses_memory: bool = False
    input_projectable: bool = False
    make_tx: Callable[[Any], optax.GradientTransformation] = lambda cfg: optax.sgd(
        cfg.learning_rate
    )
    init_extra: Callable[[Any, Any, Any], Any] = lambda params, cfg, stream: ()
    penalty: Callable[[Any, Any, Any], jax.Array] | None = None
    step_kwargs: Callable[..., dict] | None = None
    after_task: Callable[[TaskContext, Any, Any, Any], tuple[Any, Any]] | None = None


def _sample_batches(ctx: TaskContext, num_batches: int, batch_size: int):
    n = len(ctx.x_train)
    idx = ctx.rng.integers(0, n, size=(num_batches, batch_size))
    return ctx.x_train[idx], ctx.y_train[idx]


def rgo_consolidation_vectors(
    ctx: TaskContext, params: Any, *, per_sample: bool, num_batches: int, batch_size: int
) -> Any:
    """The curvature vectors of one task's consolidation pass, batches vmapped in chunks.

    ``num_batches`` batches of ``batch_size`` are drawn from the task's training data (the
    task's own FEL permutation); the softmax of the curvature weights is taken over the
    task's classes (the masked head). The chunks are a Python loop rather than a
    ``lax.map``: XLA on CPU runs convolutions inside a loop several times slower.
    """
    xs, ys = _sample_batches(ctx, num_batches, batch_size)
    logits_fn = ctx.curvature_logits_fn or ctx.logits_fn
    return curvature_vectors(
        logits_fn,
        params,
        xs,
        ys,
        jnp.int32(ctx.task),
        class_mask=jnp.asarray(ctx.class_mask),
        per_sample=per_sample,
        chunk=ctx.config.vector_chunk,
    )


def _make_rgo(
    name: str, description: str, *, fel: bool, per_sample: bool, alpha=None, dtype=None
) -> Method:
    def make_tx(cfg):
        selected = models.LINEAR_KERNELS if cfg.input_projection else None
        return _transform.rgo(cfg.learning_rate, dtype=dtype, input_projected=selected)

    def after_task(ctx: TaskContext, params, opt_state, extra):
        vecs = rgo_consolidation_vectors(
            ctx,
            params,
            per_sample=per_sample,
            num_batches=ctx.config.consolidation_batches,
            batch_size=ctx.config.batch_size,
        )
        a = ctx.config.alpha if alpha is None else alpha
        opt_state = _transform.consolidate(opt_state, vecs, a, method=ctx.config.rls_method)
        return opt_state, extra

    return Method(
        name,
        description,
        fel=fel,
        input_projectable=True,
        make_tx=make_tx,
        after_task=after_task,
    )


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered.")
    METHODS[method.name] = method
    return method


register(
    _make_rgo(
        "rgo",
        "RGO with FEL, per-batch curvature vectors (reference code)",
        fel=True,
        per_sample=False,
    )
)
register(
    _make_rgo(
        "rgo-sample",
        "RGO with FEL, per-sample curvature vectors (paper's Alg. 1)",
        fel=True,
        per_sample=True,
    )
)
register(
    _make_rgo(
        "rgo-nofel", "RGO without FEL (the paper's RGO-2 ablation)", fel=False, per_sample=False
    )
)
register(
    _make_rgo(
        "rgo-alpha1",
        "RGO with FEL and alpha = 1 (the paper's text)",
        fel=True,
        per_sample=False,
        alpha=1.0,
    )
)
register(
    _make_rgo(
        "rgo-bf16",
        "RGO with FEL, P stored in bfloat16 (half the memory)",
        fel=True,
        per_sample=False,
        dtype=jnp.bfloat16,
    )
)
register(Method("sgd", "SGD fine-tuning (lower bound)"))
register(
    Method("stl", "single-task learning: a fresh network per task", fresh_network_per_task=True)
)
register(
    Method(
        "joint",
        "joint training on all tasks seen so far (upper bound, replays data)",
        joint=True,
        uses_memory=True,
    )
)


def get_method(name: str) -> Method:
    """The registered method ``name`` (clear error listing the valid names)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}."
        ) from None


# --------------------------------------------------------------------------------------------
# Baselines (rgo_jax.baselines) wired into the harness
# --------------------------------------------------------------------------------------------


#: Every method option the harness reads (``Config.method_options``, ``--option``) and its
#: default; for a string option, a tuple of the allowed values, the first the default.
METHOD_OPTIONS: dict[str, Any] = {
    "ewc_lambda": 10.0,
    "ewc_gamma": 1.0,
    "ewc_samples": 500,
    "ewc_fisher": ("exact", "sampled", "empirical"),
    "owm_alpha": 10.0,
    "gpm_threshold": 0.97,
    "gpm_threshold_step": 0.0,
    "gpm_samples": 300,
    "agem_per_task": 250,
    "agem_batch": 64,
}


def check_method_options(options: Mapping[str, Any]) -> None:
    """Raises ``ValueError`` naming any unknown option or a value of the wrong kind."""
    for key, value in options.items():
        if key not in METHOD_OPTIONS:
            raise ValueError(
                f"Unknown method option {key!r}; valid: {', '.join(sorted(METHOD_OPTIONS))}."
            )
        allowed = METHOD_OPTIONS[key]
        if isinstance(allowed, tuple):
            if value not in allowed:
                raise ValueError(
                    f"Method option {key!r} must be one of {', '.join(allowed)}; got {value!r}."
                )
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"Method option {key!r} must be a number; got {value!r}.")


def _opt(cfg, key):
    default = METHOD_OPTIONS[key]
    return cfg.method_options.get(key, default[0] if isinstance(default, tuple) else default)


@dataclasses.dataclass(frozen=True)
class _AtTask:
    """``logits_fn`` at a fixed task id, as a hashable value.

    A jit static argument stays in JAX's compilation cache for the life of the process: a
    fresh ``lambda`` over the task context would keep that task's training data alive
    (hundreds of MB per task and seed on permuted MNIST) and recompile at every task.
    """

    logits_fn: Callable
    task: int

    def __call__(self, params, x):
        return self.logits_fn(params, x, self.task)


def _ewc(name: str, online: bool) -> Method:
    from rgo_jax import baselines  # noqa: PLC0415

    def init_extra(params, cfg, stream):
        zeros = jax.tree.map(jnp.zeros_like, params)
        state = baselines.ewc_accumulate(None, params, zeros, online=online)
        return state._replace(num_tasks=jnp.zeros_like(state.num_tasks))

    def penalty(params, extra, cfg):
        return extra.penalty(params, _opt(cfg, "ewc_lambda"))

    def after_task(ctx: TaskContext, params, opt_state, extra):
        n = min(len(ctx.x_train), int(_opt(ctx.config, "ewc_samples")))
        idx = ctx.rng.choice(len(ctx.x_train), size=n, replace=False)
        kind = _opt(ctx.config, "ewc_fisher")
        fisher = baselines.diagonal_fisher(
            _AtTask(ctx.logits_fn, int(ctx.task)),
            params,
            jnp.asarray(ctx.x_train[idx]),
            jnp.asarray(ctx.y_train[idx]),
            class_mask=jnp.asarray(ctx.class_mask),
            empirical=kind == "empirical",
            # one label per example drawn from the model: a backward pass per example
            # instead of one per example and class (the exact expectation)
            rng=jax.random.key(int(ctx.rng.integers(2**31))) if kind == "sampled" else None,
            # a compiled call per chunk for conv nets: XLA on CPU runs convolutions about
            # 10x slower inside a loop (benchmarks/perf/bench_fisher.py)
            loop="scan" if ctx.config.model == "mlp" else "calls",
        )
        extra = baselines.ewc_accumulate(
            extra, params, fisher, online=online, gamma=_opt(ctx.config, "ewc_gamma")
        )
        return opt_state, extra

    kind = "online EWC (Schwarz et al. 2018)" if online else "EWC (Kirkpatrick et al. 2017)"
    return Method(
        name,
        f"{kind}: diagonal-Fisher penalty, lambda from ewc_lambda",
        init_extra=init_extra,
        penalty=penalty,
        after_task=after_task,
    )


def _owm() -> Method:
    from rgo_jax import baselines  # noqa: PLC0415

    def make_tx(cfg):
        # Biases projected too (input 1): the reference networks of OWM and GPM have none,
        # and an unprotected bias drifts across tasks.
        return optax.chain(
            baselines.scale_by_owm(project_biases=True), optax.sgd(cfg.learning_rate)
        )

    def step_kwargs(net, params, x, task, cfg, extra, step):
        return {
            "owm_inputs": net.inputs(params, x, task),
            "owm_alpha": _opt(cfg, "owm_alpha"),
        }

    return Method(
        "owm",
        "OWM (Zeng et al. 2019): RLS on batch-mean layer inputs every step",
        make_tx=make_tx,
        step_kwargs=step_kwargs,
    )


def _gpm() -> Method:
    from rgo_jax import baselines  # noqa: PLC0415

    def make_tx(cfg):
        return optax.chain(
            baselines.scale_by_gpm(project_biases=True), optax.sgd(cfg.learning_rate)
        )

    def after_task(ctx: TaskContext, params, opt_state, extra):
        n = min(len(ctx.x_train), int(_opt(ctx.config, "gpm_samples")))
        idx = ctx.rng.choice(len(ctx.x_train), size=n, replace=False)
        reps = ctx.inputs_fn(params, jnp.asarray(ctx.x_train[idx]), ctx.task)
        reps = jax.tree.map(np.asarray, reps)
        # GPM's code raises the threshold by a fixed step per task on CIFAR / miniImageNet
        # (0.97 + 0.003 t); the default step 0 keeps it fixed (its MNIST setting).
        threshold = min(
            1.0,
            _opt(ctx.config, "gpm_threshold") + ctx.task * _opt(ctx.config, "gpm_threshold_step"),
        )
        return baselines.gpm_update_bases(opt_state, reps, threshold), extra

    return Method(
        "gpm",
        "GPM (Saha et al. 2021): gradient orthogonal to stored input bases",
        make_tx=make_tx,
        after_task=after_task,
    )


register(_ewc("ewc", online=False))
register(_ewc("online-ewc", online=True))
register(_owm())
register(_gpm())


def _agem() -> Method:
    """A-GEM with a fixed-size episodic memory kept in the method state (jit-friendly).

    After each task ``agem_per_task`` random training samples of that task are stored (with
    their class masks); every step of a later task draws ``agem_batch`` of them uniformly
    (a key folded with the task and step) for the reference gradient.
    """
    from rgo_jax import baselines  # noqa: PLC0415

    def make_tx(cfg):
        return optax.chain(baselines.agem(), optax.sgd(cfg.learning_rate))

    def init_extra(params, cfg, stream):
        per_task = int(_opt(cfg, "agem_per_task"))
        cap = per_task * cfg.num_tasks
        return {
            "x": jnp.zeros((cap, *stream.input_shape), jnp.float32),
            "y": jnp.zeros((cap,), jnp.int32),
            "mask": jnp.zeros((cap, stream.num_classes), bool),
            "n": jnp.zeros([], jnp.int32),
        }

    def step_kwargs(net, params, x, task, cfg, extra, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(17), task), step)
        size = int(_opt(cfg, "agem_batch"))
        idx = jax.random.randint(key, (size,), 0, jnp.maximum(extra["n"], 1))

        def mem_loss(p):
            z = net.logits(p, extra["x"][idx], 0)
            z = jnp.where(extra["mask"][idx], z, -1e9)
            return optax.softmax_cross_entropy_with_integer_labels(z, extra["y"][idx]).mean()

        ref = jax.grad(mem_loss)(params)
        ref = jax.tree.map(lambda g: jnp.where(extra["n"] > 0, g, jnp.zeros_like(g)), ref)
        return {"ref_grads": ref}

    def after_task(ctx: TaskContext, params, opt_state, extra):
        per_task = int(_opt(ctx.config, "agem_per_task"))
        n = min(per_task, len(ctx.x_train))
        pick = ctx.rng.choice(len(ctx.x_train), size=n, replace=False)
        lo = int(extra["n"])
        extra = {
            "x": extra["x"].at[lo : lo + n].set(jnp.asarray(ctx.x_train[pick])),
            "y": extra["y"].at[lo : lo + n].set(jnp.asarray(ctx.y_train[pick])),
            "mask": extra["mask"].at[lo : lo + n].set(jnp.asarray(ctx.class_mask)[None, :]),
            "n": jnp.asarray(lo + n, jnp.int32),
        }
        return opt_state, extra

    return Method(
        "agem",
        "A-GEM (Chaudhry et al. 2019): gradient corrected by a memory batch",
        uses_memory=True,
        make_tx=make_tx,
        init_extra=init_extra,
        step_kwargs=step_kwargs,
        after_task=after_task,
    )


register(_agem())
