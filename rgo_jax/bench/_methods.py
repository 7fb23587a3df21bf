"""Continual-learning methods: small objects with one protocol, run by :mod:`rgo_jax.bench.train`.

A method is a frozen dataclass: its name, a few flags the trainer reads (FEL sites, a fresh
network per task, joint training, replayed memory), its own typed hyperparameters
(``options``, a frozen dataclass per method family) and five hooks:

- :meth:`Method.optimizer`: the optax transformation;
- :meth:`Method.init_extra`: method state kept outside the optimizer (EWC's Fisher,
  A-GEM's memory);
- :meth:`Method.penalty`: an optional loss term (EWC), ``None`` for none;
- :meth:`Method.step_kwargs`: extra arguments of ``tx.update`` at every step (OWM's layer
  inputs, A-GEM's reference gradient);
- :meth:`Method.after_task`: task-boundary work (RGO's consolidation pass, GPM's bases).

A method sees of the run only :class:`RunInfo` (learning rate, batch size, number of
tasks, ...), never the harness's whole configuration. The presets (``rgo-alpha1``,
``rgo-nofel``, ``rgo-sample``, ...) are instances of these classes in :data:`METHODS`.

Options are addressed per method family or per preset: ``rgo.alpha`` sets ``alpha`` of
every chosen RGO preset that does not fix it itself; ``rgo-alpha1.alpha`` overrides the
value the preset ``rgo-alpha1`` fixes. The flat names of earlier versions (``ewc_lambda``,
``gpm_threshold``...; for RGO the configuration's own ``alpha``, ``consolidation_batches``
and ``rls_method``) remain their aliases: :data:`OPTION_ALIASES`.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rgo_jax import _layout, _transform
from rgo_jax._curvature import HESSIANS, curvature_vectors
from rgo_jax._transform import TRACE_NORMALISATIONS
from rgo_jax.bench import models

__all__ = [
    "AGEM",
    "EWC",
    "GPM",
    "METHODS",
    "OPTION_ALIASES",
    "OWM",
    "RGO",
    "AGEMOptions",
    "EWCOptions",
    "GPMOptions",
    "Method",
    "OWMOptions",
    "RGOOptions",
    "RunInfo",
    "TaskContext",
    "bind_options",
    "check_method_options",
    "get_method",
]


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What a method may know of the run it is part of.

    Attributes:
      learning_rate: the SGD learning rate of every method.
      batch_size: the training mini-batch size (RGO's consolidation batches have it too).
      num_tasks: tasks in the stream (A-GEM sizes its memory by it).
      vector_chunk: consolidation batches per vmapped call (memory only, not the numbers).
      input_projection: project dense-layer gradients on the input side where the
        optimizer supports it (RGO, OWM).
      convolutional: the network has convolutions (EWC then computes its Fisher in one
        compiled call per chunk: XLA on CPU runs convolutions slowly inside loops).
    """

    learning_rate: float
    batch_size: int = 10
    num_tasks: int = 1
    vector_chunk: int = 50
    input_projection: bool = False
    convolutional: bool = False


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
    run: RunInfo
    curvature_logits_fn: Callable[[Any, jax.Array, Any], jax.Array] | None = None
    """``logits_fn`` whose kernel cotangents come pre-averaged over the output axes
    (:func:`rgo_jax.nnx.use_reduced_kernel_gradients`): for curvature vectors
    only, which it gives exactly and much faster. ``None``: use ``logits_fn``."""
    wait_compiled: Callable[[], None] = lambda: None
    """Waits until :meth:`Method.compile_ahead` (run in the background) is done: call it
    before the first compiled call that it compiles, so that it is not compiled twice."""


# --------------------------------------------------------------------------------------------
# The protocol
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """A continual-learning method: SGD with nothing added (the lower bound), and the base of
    every other method.

    Attributes:
      name: registry name.
      description: one line for ``--list`` and the results.
      options: the method's hyperparameters (an instance of the class's ``Options``), or
        ``None`` for a method without any.
      fixed: names of ``options`` fields that the preset fixes: a family-level option
        (``rgo.alpha``) does not apply to them, only the preset's own (``rgo-alpha1.alpha``).
      fel: whether the network gets its FEL sites.
      fresh_network_per_task: single-task learning (STL): a new network for every task.
      joint: train on the union of all tasks seen so far (multi-task upper bound).
      uses_memory: stores and replays past data (reported in results).
    """

    #: namespace of the family's options (``rgo`` for every RGO preset); ``None``: no options.
    family: ClassVar[str | None] = None
    #: the dataclass of the family's options.
    Options: ClassVar[type | None] = None
    #: the optimizer (RGO's, OWM's) lets the layers project dense kernels' gradients on the
    #: input side (:func:`rgo_jax.nnx.use_input_projection`).
    input_projectable: ClassVar[bool] = False

    name: str
    description: str
    options: Any = None
    fixed: tuple[str, ...] = ()
    fel: bool = False
    fresh_network_per_task: bool = False
    joint: bool = False
    uses_memory: bool = False

    def __post_init__(self):
        if self.Options is not None and self.options is None:
            object.__setattr__(self, "options", self.Options())

    def optimizer(self, run: RunInfo) -> optax.GradientTransformation:
        """The optax transformation of this method."""
        return optax.sgd(run.learning_rate)

    def init_extra(self, params: Any, stream: Any, run: RunInfo) -> Any:
        """Method state kept outside the optimizer (``stream``: input shape, classes)."""
        del params, stream, run
        return ()

    def penalty(self, params: Any, extra: Any) -> jax.Array | None:
        """A term added to the loss, or ``None`` (traced: decided by the method, not data)."""
        del params, extra
        return None

    def step_kwargs(self, net: Any, params: Any, x, task, extra: Any, step) -> dict:
        """Extra keyword arguments of ``tx.update`` at every step (traced in the step)."""
        del net, params, x, task, extra, step
        return {}

    def before_gradient(self, net: Any, params: Any, x, task, extra: Any, step, opt_state):
        """With input-side projection: ``(opt_state, kwargs)``, the state whose P the layers
        project with and the extra arguments of ``tx.update`` (traced in the step). Default:
        the state unchanged and :meth:`step_kwargs`."""
        return opt_state, self.step_kwargs(net, params, x, task, extra, step)

    def after_task(self, ctx: TaskContext, params: Any, opt_state: Any, extra: Any):
        """Task-boundary work: returns the new ``(opt_state, extra)``."""
        del ctx, params
        return opt_state, extra

    def compile_ahead(self, ctx: TaskContext, params: Any, opt_state: Any, extra: Any) -> None:
        """Compiles (without running) task-boundary work for the shapes of ``ctx`` and the state.

        The harness calls it in a background thread while the first task trains, with a
        ``ctx`` of its own (its ``rng`` may be drawn from). Nothing by default.
        """
        del ctx, params, opt_state, extra


class _OptionError(ValueError):
    """A method option's value is refused: ``problem`` says why (``must be ...``)."""

    def __init__(self, name: str, problem: str):
        super().__init__(f"{name} {problem}")
        self.problem = problem


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise _OptionError(name, f"must be one of {', '.join(allowed)}; got {value!r}.")


def _number(name: str, value: Any, *, positive: bool = False, integer: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _OptionError(name, f"must be a number; got {value!r}.")
    if integer and value != int(value):
        raise _OptionError(name, f"must be an integer; got {value!r}.")
    if positive and not value > 0:
        raise _OptionError(name, f"must be positive; got {value!r}.")


# --------------------------------------------------------------------------------------------
# RGO
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RGOOptions:
    """RGO's hyperparameters.

    Attributes:
      alpha: the RLS regulariser of the projection (reference code 0.01; paper text 1).
      consolidation_batches: batches of the consolidation pass at each task's end.
      rls_method: the RLS kernel, ``block`` (Woodbury) or ``sequential`` (rank-one scan).

    Extensions beyond the paper (each off by default and in every reproduction row; see
    ``benchmarks/REPRODUCIBILITY.md``, "Beyond the paper"):

    Attributes:
      hessian: the output-Hessian factor of the curvature vectors: ``true-class`` (the
        reference code), ``full`` (the paper's Eq. 13: ``diag(p) - p p^T`` through its
        square-root factor, one vector per class) or ``sampled`` (a sampled Fisher, one
        vector per batch): :func:`rgo_jax.curvature_vectors`' ``hessian``.
      alpha_scale: ``absolute`` (alpha as given) or ``relative`` (each leaf's alpha times
        ``tr(sum v v^T) / d`` of its vectors of the task: :func:`rgo_jax.update_projection`'s
        ``relative_alpha``).
      trace_normalisation: ``per-leaf`` (the paper) or ``global`` (one ``d / tr P`` scale for
        the whole network: :func:`rgo_jax.scale_by_rgo`'s ``trace_normalisation``).
      consolidation: ``sampled`` (``consolidation_batches`` batches drawn with replacement,
        the reference code) or ``epoch`` (every training example of the task once, shuffled,
        in training-size batches; ``consolidation_batches`` is then unused).
    """

    alpha: float = 0.01
    consolidation_batches: int = 1000
    rls_method: str = "block"
    hessian: str = "true-class"
    alpha_scale: str = "absolute"
    trace_normalisation: str = "per-leaf"
    consolidation: str = "sampled"

    def __post_init__(self):
        _number("rgo.alpha", self.alpha, positive=True)
        _number(
            "rgo.consolidation_batches", self.consolidation_batches, positive=True, integer=True
        )
        _choice("rgo.rls_method", self.rls_method, ("block", "sequential"))
        _choice("rgo.hessian", self.hessian, HESSIANS)
        _choice("rgo.alpha_scale", self.alpha_scale, ("absolute", "relative"))
        _choice("rgo.trace_normalisation", self.trace_normalisation, TRACE_NORMALISATIONS)
        _choice("rgo.consolidation", self.consolidation, ("sampled", "epoch"))


def _sample_batches(ctx: TaskContext, num_batches: int, batch_size: int):
    n = len(ctx.x_train)
    idx = ctx.rng.integers(0, n, size=(num_batches, batch_size))
    return ctx.x_train[idx], ctx.y_train[idx]


def _epoch_batches(ctx: TaskContext, batch_size: int):
    """Every training example once, shuffled, in batches (a short last batch is dropped)."""
    n = len(ctx.x_train) // batch_size * batch_size
    idx = ctx.rng.permutation(len(ctx.x_train))[:n].reshape(-1, batch_size)
    return ctx.x_train[idx], ctx.y_train[idx]


def rgo_consolidation_vectors(
    ctx: TaskContext,
    params: Any,
    *,
    per_sample: bool,
    num_batches: int | None,
    batch_size: int,
    hessian: str = "true-class",
) -> Any:
    """The curvature vectors of one task's consolidation pass, batches vmapped in chunks.

    ``num_batches`` batches of ``batch_size`` are drawn from the task's training data (the
    task's own FEL permutation); the softmax of the curvature weights is taken over the
    task's classes (the masked head). The chunks (``ctx.run.vector_chunk`` batches each) are
    a Python loop rather than a ``lax.map``: XLA on CPU runs convolutions inside a loop
    several times slower. ``num_batches=None``: every training example once (an epoch).
    ``hessian`` as for :func:`rgo_jax.curvature_vectors` (``sampled`` draws its key from
    ``ctx.rng`` after the batches).
    """
    if num_batches is None:
        xs, ys = _epoch_batches(ctx, batch_size)
    else:
        xs, ys = _sample_batches(ctx, num_batches, batch_size)
    logits_fn = ctx.curvature_logits_fn or ctx.logits_fn
    extra = {}
    if hessian != "true-class":
        extra["hessian"] = hessian
    if hessian == "sampled":
        extra["rng"] = jax.random.key(int(ctx.rng.integers(2**31)))
    return curvature_vectors(
        logits_fn,
        params,
        xs,
        ys,
        jnp.int32(ctx.task),
        class_mask=jnp.asarray(ctx.class_mask),
        per_sample=per_sample,
        chunk=ctx.run.vector_chunk,
        **extra,
    )


def _weak(x) -> bool:
    """Whether ``x`` is weakly typed (part of a compiled function's cache key)."""
    return bool(getattr(getattr(x, "aval", None), "weak_type", False))


@dataclasses.dataclass(frozen=True)
class RGO(Method):
    """RGO: gradients projected by per-layer P matrices, consolidated at each task's end.

    Attributes:
      per_sample: one curvature vector per sample (the paper's Alg. 1) instead of one per
        batch (the reference code).
      dtype: storage dtype of P (``None``: the parameters' dtype).
    """

    family: ClassVar[str] = "rgo"
    Options: ClassVar[type] = RGOOptions
    input_projectable: ClassVar[bool] = True

    fel: bool = True
    per_sample: bool = False
    dtype: Any = None

    def optimizer(self, run: RunInfo) -> optax.GradientTransformation:
        selected = models.LINEAR_KERNELS if run.input_projection else None
        extra = {}
        if self.options.trace_normalisation != "per-leaf":
            extra["trace_normalisation"] = self.options.trace_normalisation
        return _transform.rgo(
            run.learning_rate, dtype=self.dtype, input_projected=selected, **extra
        )

    def after_task(self, ctx: TaskContext, params, opt_state, extra):
        opts = self.options
        vecs = rgo_consolidation_vectors(
            ctx,
            params,
            per_sample=self.per_sample,
            num_batches=None if opts.consolidation == "epoch" else opts.consolidation_batches,
            batch_size=ctx.run.batch_size,
            hessian=opts.hessian,
        )
        ctx.wait_compiled()
        kwargs = {"method": opts.rls_method}
        if opts.alpha_scale == "relative":
            kwargs["relative_alpha"] = True
        opt_state = _transform.consolidate(opt_state, vecs, opts.alpha, **kwargs)
        return opt_state, extra

    def compile_ahead(self, ctx: TaskContext, params, opt_state, extra) -> None:
        """Compiles the consolidation's RLS update (the slowest compilation of a run).

        The vectors' shapes come from :func:`jax.eval_shape` (nothing is computed), and the
        update is lowered with the arguments :func:`rgo_jax.consolidate` gives it, so the
        compiled program is the one the task's end then calls.
        """
        del extra
        opts = self.options
        vecs = jax.eval_shape(
            lambda p: rgo_consolidation_vectors(
                ctx,
                p,
                per_sample=self.per_sample,
                num_batches=None if opts.consolidation == "epoch" else opts.consolidation_batches,
                batch_size=ctx.run.batch_size,
                hessian=opts.hessian,
            ),
            params,
        )
        block = inspect.signature(_transform.update_projection).parameters["block_size"].default
        alpha = jax.ShapeDtypeStruct((), jnp.float32)  # update_projection's float32 array
        for state in _transform.rgo_states(opt_state):
            abstract = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=_weak(x)), state
            )
            _transform._update_program(opts.rls_method).lower(
                abstract,
                vecs,
                alpha,
                opts.rls_method,
                int(block),
                opts.alpha_scale == "relative",
                True,  # checked_only: the first stage of update_projection (_absorb)
            ).compile()


# --------------------------------------------------------------------------------------------
# Baselines (rgo_jax.baselines) wired into the harness
# --------------------------------------------------------------------------------------------


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


_FISHERS = ("exact", "sampled", "empirical")


@dataclasses.dataclass(frozen=True)
class EWCOptions:
    """EWC's hyperparameters.

    Attributes:
      lambda_: strength of the penalty (option name ``ewc.lambda``).
      gamma: decay of the accumulated Fisher (online EWC).
      samples: training examples per task for the Fisher.
      fisher: ``exact`` (expectation over the model's classes), ``sampled`` (one label per
        example drawn from the model) or ``empirical`` (the true labels).
    """

    lambda_: float = 10.0
    gamma: float = 1.0
    samples: int = 500
    fisher: str = "exact"

    def __post_init__(self):
        _number("ewc.lambda", self.lambda_)
        _number("ewc.gamma", self.gamma)
        _number("ewc.samples", self.samples, positive=True, integer=True)
        _choice("ewc.fisher", self.fisher, _FISHERS)


@dataclasses.dataclass(frozen=True)
class EWC(Method):
    """EWC: a diagonal-Fisher penalty on moving away from earlier tasks' parameters."""

    family: ClassVar[str] = "ewc"
    Options: ClassVar[type] = EWCOptions

    online: bool = False

    def init_extra(self, params, stream, run):
        from rgo_jax import baselines  # noqa: PLC0415

        zeros = jax.tree.map(jnp.zeros_like, params)
        state = baselines.ewc_accumulate(None, params, zeros, online=self.online)
        return state._replace(num_tasks=jnp.zeros_like(state.num_tasks))

    def penalty(self, params, extra):
        return extra.penalty(params, self.options.lambda_)

    def after_task(self, ctx: TaskContext, params, opt_state, extra):
        from rgo_jax import baselines  # noqa: PLC0415

        n = min(len(ctx.x_train), int(self.options.samples))
        idx = ctx.rng.choice(len(ctx.x_train), size=n, replace=False)
        kind = self.options.fisher
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
            loop="calls" if ctx.run.convolutional else "scan",
        )
        extra = baselines.ewc_accumulate(
            extra, params, fisher, online=self.online, gamma=self.options.gamma
        )
        return opt_state, extra


@dataclasses.dataclass(frozen=True)
class OWMOptions:
    """OWM's hyperparameters. Attributes: alpha: the RLS regulariser of its projection."""

    alpha: float = 10.0

    def __post_init__(self):
        _number("owm.alpha", self.alpha, positive=True)


@dataclasses.dataclass(frozen=True)
class OWM(Method):
    """OWM: RLS on the batch-mean layer inputs at every step.

    With ``RunInfo.input_projection`` the dense kernels' gradients are projected by their
    layers, ``(P X^T) D`` (``scale_by_owm(input_projected=...)``): P absorbs the step's
    inputs before the gradient (:meth:`before_gradient`), so the update is the same.
    """

    family: ClassVar[str] = "owm"
    Options: ClassVar[type] = OWMOptions
    input_projectable: ClassVar[bool] = True

    def optimizer(self, run):
        from rgo_jax import baselines  # noqa: PLC0415

        # Biases projected too (input 1): the reference networks of OWM and GPM have none,
        # and an unprotected bias drifts across tasks.
        selected = models.LINEAR_KERNELS if run.input_projection else None
        return optax.chain(
            baselines.scale_by_owm(project_biases=True, input_projected=selected),
            optax.sgd(run.learning_rate),
        )

    def step_kwargs(self, net, params, x, task, extra, step):
        return {"owm_inputs": net.inputs(params, x, task), "owm_alpha": self.options.alpha}

    def before_gradient(self, net, params, x, task, extra, step, opt_state):
        from rgo_jax import baselines  # noqa: PLC0415

        kwargs = self.step_kwargs(net, params, x, task, extra, step)
        return baselines.owm_update(opt_state, kwargs["owm_inputs"], kwargs["owm_alpha"]), {}


@dataclasses.dataclass(frozen=True)
class GPMOptions:
    """GPM's hyperparameters.

    Attributes:
      threshold: fraction of the representations' energy the bases keep: one number for
        every layer, or a list of one per weight layer in forward order (GPM's code on
        permuted MNIST: ``[0.95, 0.99, 0.99]`` for its three layers); a layer's bias, if
        projected, follows its kernel.
      threshold_step: added to the threshold(s) per task (GPM's code on CIFAR: 0.003).
      samples: training examples per task whose layer inputs give the bases.
    """

    threshold: float | tuple[float, ...] = 0.97
    threshold_step: float = 0.0
    samples: int = 300

    def __post_init__(self):
        if isinstance(self.threshold, (list, tuple)):
            if not self.threshold:
                raise _OptionError("gpm.threshold", "must not be an empty list.")
            for i, t in enumerate(self.threshold):
                _number(f"gpm.threshold[{i}]", t)
            object.__setattr__(self, "threshold", tuple(self.threshold))
        else:
            _number("gpm.threshold", self.threshold)
        _number("gpm.threshold_step", self.threshold_step)
        _number("gpm.samples", self.samples, positive=True, integer=True)

    def layer_thresholds(self, kernel_paths: list[str], task: int) -> float | dict[str, float]:
        """The threshold of task ``task``: a number, or ``path -> float`` for every kernel of
        ``kernel_paths`` (forward order) and the bias beside it.

        Examples:
          >>> GPMOptions(threshold=[0.9, 0.99]).layer_thresholds(["a/kernel", "b/kernel"], 0)
          {'a/kernel': 0.9, 'a/bias': 0.9, 'b/kernel': 0.99, 'b/bias': 0.99}
          >>> GPMOptions(threshold=0.97, threshold_step=0.01).layer_thresholds([], 2)
          0.99
        """

        # GPM's code raises the threshold by a fixed step per task on CIFAR / miniImageNet
        # (0.97 + 0.003 t); the default step 0 keeps it fixed (its MNIST setting).
        def at(t0: float) -> float:
            return min(1.0, t0 + task * self.threshold_step)

        if not isinstance(self.threshold, tuple):
            return at(self.threshold)
        self.check_layers(kernel_paths)
        out = {}
        for path, t0 in zip(kernel_paths, self.threshold, strict=True):
            out[path] = at(t0)
            out[path.removesuffix("kernel") + "bias"] = at(t0)
        return out

    def check_layers(self, kernel_paths: list[str]) -> None:
        """Raises ``ValueError`` if a list of thresholds does not have one per kernel."""
        if isinstance(self.threshold, tuple) and len(self.threshold) != len(kernel_paths):
            raise ValueError(
                f"gpm.threshold lists {len(self.threshold)} thresholds, but the network has "
                f"{len(kernel_paths)} weight layers ({', '.join(kernel_paths)}): give one per "
                "layer, in forward order, or a single number."
            )


def _scale_by_gpm_input_side() -> optax.GradientTransformationExtraArgs:
    r"""GPM's projection of a dense kernel's gradient through the span of its batch inputs.

    A dense kernel's gradient is ``G = X^T D`` for the batch inputs ``X [B, d]``, so
    ``G = Q Q^T G`` with ``Q [d, B]`` an orthonormal basis of ``X``'s rows (QR), and

    .. math::  (I - M M^\top) G = \big(Q - M (M^\top Q)\big) (Q^\top G) ,

    which touches ``M`` with ``B`` columns instead of ``G``'s ``m``: for permuted MNIST's
    784 x 100 first layer at batch 10, about 8x fewer FLOPs than ``G - M (M^T G)``. The
    result is orthogonal to ``M`` by construction. Valid only for a gradient of the loss
    alone (GPM adds no penalty); leaves without inputs, or with ``B >= d``, are projected as
    :func:`rgo_jax.baselines.scale_by_gpm` does. The state is ``scale_by_gpm``'s, so
    checkpoints are interchangeable; the numbers agree with it to float32 rounding.
    Extra argument ``gpm_inputs``: ``{path: [B, d]}`` layer inputs of the step's batch.
    """
    from rgo_jax import _matrices, baselines  # noqa: PLC0415
    from rgo_jax.baselines._gpm import project_out_basis  # noqa: PLC0415

    base = baselines.scale_by_gpm(project_biases=True)

    def update_fn(updates, state, params=None, gpm_inputs=None, **extra_args):
        del params, extra_args
        inputs = gpm_inputs or {}
        specs = _matrices.leaf_specs(updates, None, True, bias_input=True)

        def one(path, g, m, r):
            name = _layout.path_str(path)
            spec = specs[name]
            if spec is None or _matrices.is_placeholder(m):
                return g
            x = inputs.get(name)
            rank = jnp.max(r, initial=0)
            m = m.astype(g.dtype)
            if x is not None and g.ndim == 2 and x.ndim == 2 and x.shape[0] < x.shape[1]:
                q, _ = jnp.linalg.qr(jnp.swapaxes(x, 0, 1).astype(g.dtype))  # [d, B]
                return project_out_basis(m, q, rank) @ (jnp.swapaxes(q, 0, 1) @ g)
            return spec.from_matrix(project_out_basis(m, spec.to_matrix(g), rank))

        return jax.tree_util.tree_map_with_path(one, updates, state.bases, state.rank), state

    return optax.GradientTransformationExtraArgs(base.init, update_fn)


@dataclasses.dataclass(frozen=True)
class GPM(Method):
    """GPM: the gradient kept orthogonal to stored bases of earlier tasks' layer inputs.

    With ``RunInfo.input_projection`` (``Config.input_projection``, which changes how the
    step is computed, not the protocol) dense kernels are projected through the span of the
    batch's inputs (:func:`_scale_by_gpm_input_side`), several times cheaper at batch 10.
    """

    family: ClassVar[str] = "gpm"
    Options: ClassVar[type] = GPMOptions

    def optimizer(self, run):
        from rgo_jax import baselines  # noqa: PLC0415

        if run.input_projection:
            return optax.chain(_scale_by_gpm_input_side(), optax.sgd(run.learning_rate))
        return optax.chain(
            baselines.scale_by_gpm(project_biases=True), optax.sgd(run.learning_rate)
        )

    def step_kwargs(self, net, params, x, task, extra, step):
        # Read only by the input-side projection; otherwise unused and compiled away.
        inputs = net.inputs(params, x, task)
        return {"gpm_inputs": {models.param_path_str(k): v for k, v in inputs.items()}}

    def init_extra(self, params, stream, run):
        self.options.check_layers(_kernel_paths(params))  # a wrong list fails before training
        return ()

    def after_task(self, ctx: TaskContext, params, opt_state, extra):
        from rgo_jax import baselines  # noqa: PLC0415

        n = min(len(ctx.x_train), int(self.options.samples))
        idx = ctx.rng.choice(len(ctx.x_train), size=n, replace=False)
        reps = ctx.inputs_fn(params, jnp.asarray(ctx.x_train[idx]), ctx.task)
        # the kernels in forward order, read before jax.tree.map (which sorts the keys)
        paths = [models.param_path_str(k) for k in reps]
        reps = jax.tree.map(np.asarray, reps)
        threshold = self.options.layer_thresholds(paths, ctx.task)
        return baselines.gpm_update_bases(opt_state, reps, threshold), extra


def _kernel_paths(params: Any) -> list[str]:
    """The paths of the ``kernel`` leaves of ``params`` (sorted by key, not forward order:
    for counting the weight layers before any forward pass)."""
    paths = [_layout.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)]
    return [p for p in paths if p.endswith("kernel")]


@dataclasses.dataclass(frozen=True)
class AGEMOptions:
    """A-GEM's hyperparameters.

    Attributes:
      per_task: training examples of each task stored in the episodic memory.
      batch: memory examples per step for the reference gradient.
    """

    per_task: int = 250
    batch: int = 64

    def __post_init__(self):
        _number("agem.per_task", self.per_task, positive=True, integer=True)
        _number("agem.batch", self.batch, positive=True, integer=True)


@dataclasses.dataclass(frozen=True)
class AGEM(Method):
    """A-GEM with a fixed-size episodic memory kept in the method state (jit-friendly).

    After each task ``per_task`` random training samples of that task are stored (with
    their class masks); every step of a later task draws ``batch`` of them uniformly (a key
    folded with the task and step) for the reference gradient.
    """

    family: ClassVar[str] = "agem"
    Options: ClassVar[type] = AGEMOptions

    uses_memory: bool = True

    def optimizer(self, run):
        from rgo_jax import baselines  # noqa: PLC0415

        return optax.chain(baselines.agem(), optax.sgd(run.learning_rate))

    def init_extra(self, params, stream, run):
        cap = int(self.options.per_task) * run.num_tasks
        return {
            "x": jnp.zeros((cap, *stream.input_shape), jnp.float32),
            "y": jnp.zeros((cap,), jnp.int32),
            "mask": jnp.zeros((cap, stream.num_classes), bool),
            "n": jnp.zeros([], jnp.int32),
        }

    def step_kwargs(self, net, params, x, task, extra, step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(17), task), step)
        size = int(self.options.batch)
        idx = jax.random.randint(key, (size,), 0, jnp.maximum(extra["n"], 1))

        def mem_loss(p):
            z = net.logits(p, extra["x"][idx], 0)
            z = jnp.where(extra["mask"][idx], z, -1e9)
            return optax.softmax_cross_entropy_with_integer_labels(z, extra["y"][idx]).mean()

        ref = jax.grad(mem_loss)(params)
        ref = jax.tree.map(lambda g: jnp.where(extra["n"] > 0, g, jnp.zeros_like(g)), ref)
        return {"ref_grads": ref}

    def after_task(self, ctx: TaskContext, params, opt_state, extra):
        n = min(int(self.options.per_task), len(ctx.x_train))
        pick = ctx.rng.choice(len(ctx.x_train), size=n, replace=False)
        lo = int(extra["n"])
        extra = {
            "x": extra["x"].at[lo : lo + n].set(jnp.asarray(ctx.x_train[pick])),
            "y": extra["y"].at[lo : lo + n].set(jnp.asarray(ctx.y_train[pick])),
            "mask": extra["mask"].at[lo : lo + n].set(jnp.asarray(ctx.class_mask)[None, :]),
            "n": jnp.asarray(lo + n, jnp.int32),
        }
        return opt_state, extra


# --------------------------------------------------------------------------------------------
# The registry: presets are instances
# --------------------------------------------------------------------------------------------


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Adds a method to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is already registered.")
    if method.family is not None and method.name != method.family and method.name in _families():
        raise ValueError(f"method name {method.name!r} is an option namespace.")
    METHODS[method.name] = method
    return method


def _families() -> set[str]:
    return {m.family for m in METHODS.values() if m.family is not None}


for _m in (
    RGO("rgo", "RGO with FEL, per-batch curvature vectors (reference code)"),
    RGO(
        "rgo-sample", "RGO with FEL, per-sample curvature vectors (paper's Alg. 1)", per_sample=True
    ),
    RGO("rgo-nofel", "RGO without FEL (the paper's RGO-2 ablation)", fel=False),
    RGO(
        "rgo-alpha1",
        "RGO with FEL and alpha = 1 (the paper's text; rgo.alpha does not apply, "
        "rgo-alpha1.alpha overrides it)",
        options=RGOOptions(alpha=1.0),
        fixed=("alpha",),
    ),
    RGO("rgo-bf16", "RGO with FEL, P stored in bfloat16 (half the memory)", dtype=jnp.bfloat16),
    RGO(
        "rgo-plus",
        "RGO beyond the paper: one trace normalisation for the whole network "
        "(rgo.trace_normalisation=global); not in the reproduction rows",
        options=RGOOptions(trace_normalisation="global"),
        fixed=("trace_normalisation",),
    ),
    Method("sgd", "SGD fine-tuning (lower bound)"),
    Method("stl", "single-task learning: a fresh network per task", fresh_network_per_task=True),
    Method(
        "joint",
        "joint training on all tasks seen so far (upper bound, replays data)",
        joint=True,
        uses_memory=True,
    ),
    EWC("ewc", "EWC (Kirkpatrick et al. 2017): diagonal-Fisher penalty, strength ewc.lambda"),
    EWC(
        "online-ewc",
        "online EWC (Schwarz et al. 2018): diagonal-Fisher penalty, strength ewc.lambda",
        online=True,
    ),
    OWM("owm", "OWM (Zeng et al. 2019): RLS on batch-mean layer inputs every step"),
    GPM("gpm", "GPM (Saha et al. 2021): gradient orthogonal to stored input bases"),
    AGEM("agem", "A-GEM (Chaudhry et al. 2019): gradient corrected by a memory batch"),
):
    register(_m)
del _m


def get_method(name: str) -> Method:
    """The registered method ``name`` with its default options (clear error otherwise)."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"Unknown method {name!r}; valid methods: {', '.join(sorted(METHODS))}."
        ) from None


# --------------------------------------------------------------------------------------------
# Options: addressed per family or preset; the flat names of earlier versions as aliases
# --------------------------------------------------------------------------------------------


def _field_key(field: dataclasses.Field) -> str:
    return field.name.rstrip("_")  # EWCOptions.lambda_ is the option "lambda"


def _option_fields(options_cls: type) -> dict[str, dataclasses.Field]:
    return {_field_key(f): f for f in dataclasses.fields(options_cls)}


#: The flat option names of earlier versions (``Config.method_options``) and the
#: configuration fields that were RGO's, each with the addressed option it stands for.
OPTION_ALIASES: dict[str, str] = {
    "alpha": "rgo.alpha",
    "consolidation_batches": "rgo.consolidation_batches",
    "rls_method": "rgo.rls_method",
    "ewc_lambda": "ewc.lambda",
    "ewc_gamma": "ewc.gamma",
    "ewc_samples": "ewc.samples",
    "ewc_fisher": "ewc.fisher",
    "owm_alpha": "owm.alpha",
    "gpm_threshold": "gpm.threshold",
    "gpm_threshold_step": "gpm.threshold_step",
    "gpm_samples": "gpm.samples",
    "agem_per_task": "agem.per_task",
    "agem_batch": "agem.batch",
}


def _family_options(family: str) -> type:
    return next(m.Options for m in METHODS.values() if m.family == family)


def _parse_key(key: str) -> tuple[str, str]:
    """``key`` (addressed or an alias) as ``(scope, option)``; scope a family or a preset."""
    key = OPTION_ALIASES.get(key, key)
    scope, sep, option = key.partition(".")
    families = _families()
    known = sorted(OPTION_ALIASES) + sorted(
        f"{fam}.{k}" for fam in families for k in _option_fields(_family_options(fam))
    )
    if not sep or (scope not in families and scope not in METHODS):
        raise ValueError(f"Unknown method option {key!r}; valid: {', '.join(known)}.")
    method_family = scope if scope in families else METHODS[scope].family
    if method_family is None:
        raise ValueError(f"Method {scope!r} has no options (option {key!r}).")
    fields = _option_fields(_family_options(method_family))
    if option not in fields:
        raise ValueError(
            f"Method option {key!r}: {scope} has no option {option!r}; its options: "
            f"{', '.join(f'{scope}.{k}' for k in fields)}."
        )
    return scope, option


def check_method_options(options: Mapping[str, Any], methods: tuple[str, ...] = ()) -> None:
    """Raises ``ValueError`` naming an unknown option, a value of the wrong kind, or (for an
    addressed option, ``scope.name``) one that none of ``methods`` has.

    The flat names of earlier versions (:data:`OPTION_ALIASES`) are accepted whichever
    methods run, so that one configuration file serves several method subsets.

    Examples:
      >>> check_method_options({"ewc.lambda": 5.0}, ("ewc", "sgd"))
      >>> check_method_options({"ewc.lambda": 5.0}, ("rgo",))
      Traceback (most recent call last):
      ...
      ValueError: Method option 'ewc.lambda' applies to none of the methods rgo.
    """
    for key, value in options.items():
        scope, option = _parse_key(key)
        if key not in OPTION_ALIASES and methods:
            chosen = [get_method(m) for m in methods]
            if not any(scope in (m.name, m.family) for m in chosen):
                raise ValueError(
                    f"Method option {key!r} applies to none of the methods {', '.join(methods)}."
                )
        family = scope if scope in _families() else METHODS[scope].family
        # the options dataclass checks the value's kind and range, naming the option
        try:
            _family_options(family)(**{_option_fields(_family_options(family))[option].name: value})
        except _OptionError as err:
            raise ValueError(f"Method option {key!r} {err.problem}") from None


def bind_options(name: str, options: Mapping[str, Any]) -> Method:
    """The method ``name`` with ``options`` applied (keys addressed or aliases).

    A family-level value (``rgo.alpha``, or its alias ``alpha``) sets the field on the
    preset unless the preset fixes it (``Method.fixed``); a preset-level value
    (``rgo-alpha1.alpha``) always does.

    Examples:
      >>> bind_options("rgo", {"rgo.alpha": 0.5}).options.alpha
      0.5
      >>> bind_options("rgo-alpha1", {"rgo.alpha": 0.5}).options.alpha
      1.0
      >>> bind_options("rgo-alpha1", {"rgo-alpha1.alpha": 0.5}).options.alpha
      0.5
    """
    method = get_method(name)
    if method.family is None:
        return method
    fields = _option_fields(method.Options)
    family_level, preset_level = {}, {}
    for key, value in options.items():
        scope, option = _parse_key(key)
        if scope == method.name and scope != method.family:
            preset_level[fields[option].name] = value
        elif scope == method.family and fields[option].name not in method.fixed:
            family_level[fields[option].name] = value
    changes = {**family_level, **preset_level}
    if not changes:
        return method
    return dataclasses.replace(method, options=dataclasses.replace(method.options, **changes))


def option_help() -> str:
    """One line per family: its options and their defaults (for ``--help``)."""
    lines = []
    for family in sorted(_families()):
        defaults = _family_options(family)()
        items = ", ".join(
            f"{family}.{k}={getattr(defaults, f.name)!r}"
            for k, f in _option_fields(type(defaults)).items()
        )
        lines.append(items)
    return "; ".join(lines)
