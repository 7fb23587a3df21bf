"""The continual-learning harness: task streams, compiled training, evaluation, results.

``run(config, workdir)`` trains every method of ``config`` on every seed, task after task
(task-incremental: the task id is known at train and test time, the head is one shared
output layer whose logits outside the current task are masked), fills the accuracy matrix
``R[i, j]`` (accuracy on task ``j`` after training task ``i``; ``j = i + 1`` too, for FWT)
and writes the run directory: ``config.json``, ``results.json``, ``summary.md``, plots, and
Orbax checkpoints at every task boundary from which an interrupted run resumes with the
same numbers.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rgo_jax.bench import _plot_style, _profile, _report, data, models
from rgo_jax.bench._checkpoint import (
    latest_good_checkpoint,
    prune_checkpoints,
    restore_checkpoint,
    save_checkpoint,
)
from rgo_jax.bench._methods import (
    METHODS,
    OPTION_ALIASES,
    Method,
    RunInfo,
    TaskContext,
    bind_options,
    check_method_options,
    get_method,
)
from rgo_jax.bench._rundir import (
    checkpoint_root,
    prepare_run_dir,
    removed_if_left_empty,
    split_by_resume_point,
    write_report,
)
from rgo_jax.bench._stream_transforms import MultiHead
from rgo_jax.bench._validate import RunError, check_config, check_finite_losses, check_finite_state
from rgo_jax.nnx import use_input_projection, use_reduced_kernel_gradients

__all__ = [
    "ADDED_KEYS",
    "BENCHMARKS",
    "MERGE_FREE_KEYS",
    "OUTPUT_KEYS",
    "Config",
    "build_stream",
    "register_benchmark",
    "run",
]

#: :class:`Config` keys that never change a run's numbers (what runs, where, what is
#: written, memory chunking); left out of the checkpoint fingerprint.
OUTPUT_KEYS = (
    "methods",
    "seeds",
    "data_dir",
    "plots",
    "checkpoint",
    "vector_chunk",
    "keep_checkpoints",
)
#: Keys that change how a protocol is executed, and so its float rounding, not the protocol:
#: a run resumes only under the same values, but runs that differ in them (and in
#: :data:`OUTPUT_KEYS`) merge into one report (:func:`rgo_jax.bench.merge_run_reports`).
MERGE_FREE_KEYS = OUTPUT_KEYS + (
    "vmap_seeds",
    "vmap_memory_gb",
    "chunk_steps",
    "scan_unroll",
    "eval_batch_size",
    "input_projection",
)

#: :class:`Config` keys added after runs had been published, with the value those runs used.
#: A key at this value is left out of the fingerprint (older checkpoints still resume), and a
#: run report without the key reads as this value when runs are merged.
ADDED_KEYS = {
    "init": "lecun",
    "init_scale": 1.0,
    "dataset": None,
    "stream": None,
    "classes_per_task": None,
    "bias": True,
    "normalize": None,
    "subsample": "random",
}

#: ``stream`` values of a :class:`Config` that names its own ``dataset``: the builders.
STREAMS = {"split": data.class_split, "permuted": data.permuted, "rotated": data.rotated}

#: Task checkpoints kept per method and seed unless ``keep_checkpoints``: the last one is
#: what a rerun resumes from; the one before is where it falls back when the last is corrupt.
KEPT_CHECKPOINTS = 2

_NEG = -1e9  # masked logits (the reference code's "large negative value")


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment. Defaults are the paper's MNIST protocol (Table 1).

    Attributes:
      benchmark: a key of :data:`BENCHMARKS` (``permuted_mnist``, ``split_cifar100``...;
        :func:`register_benchmark` adds one), or only a label when ``dataset`` is given.
      dataset, stream, classes_per_task: a data set of one's own instead of ``benchmark``:
        ``dataset`` a name :func:`rgo_jax.bench.data.load_dataset` reads (``notmnist``, or
        a path to an ``.npz`` file), ``stream`` one of :data:`STREAMS` (``split``,
        ``permuted``, ``rotated``), ``classes_per_task`` the classes of each task of a
        split (default: the classes divided evenly among ``num_tasks``).
      methods: method names (``rgo-bench --list``); each gets the same data, seeds, steps.
      model, hidden, width: the network: ``hidden`` the MLP's hidden widths (default 256,
        256) or AlexNet's ``fc1``/``fc2`` widths (default 2048, 2048); ``width`` for ResNets.
      init: the parameter initialisation, a key of :data:`rgo_jax.bench.models.INIT_SCHEMES`:
        ``lecun`` (Flax's default), ``torch`` or ``glorot``; ``init_scale`` multiplies every
        initial kernel. Both change how much RGO forgets (``benchmarks/REPRODUCIBILITY.md``).
      bias: the MLP's layers have biases (``False``: none, as in GPM's and OWM's MNIST
        networks; only for ``model`` ``mlp``).
      normalize: ``(mean, std)``: every input value becomes ``(x - mean) / std`` before the
        tasks are built (GPM's code standardises MNIST with ``(0.1307, 0.3081)``); ``None``
        (the default) keeps the loaders' ``[0, 1]`` values.
      num_tasks, steps_per_task, batch_size, learning_rate: the training budget (SGD).
      alpha, consolidation_batches, rls_method: RGO's options ``rgo.alpha``,
        ``rgo.consolidation_batches``, ``rgo.rls_method``
        (:class:`rgo_jax.bench._methods.RGOOptions`), kept as fields under their earlier
        names: every published configuration and checkpoint fingerprint spells them so.
      seeds: seeds of data order, permutations and initialisation.
      data_dir: folder of the data sets (else ``$RGO_DATA_DIR``, then ``~/.cache/rgo_jax``).
      max_train_per_task, max_test_per_task: optional subsampling for quick runs.
      subsample: how those choose: ``"random"`` (a seeded random subset per task) or
        ``"first"`` (the first samples, the same for every task, as GPM's code).
      validation_fraction: evaluate on this held-out part of TRAIN instead of test (tuning).
      first_task_identity: task 0 of permuted streams unpermuted (reference code).
      fel_seed: seed of the FEL permutations.
      head: ``masked`` (one shared head, logits outside the task masked) or ``multi``.
      vmap_seeds, vmap_memory_gb: train seeds together under ``vmap`` while their training
        data fit in this many GiB; sequentially otherwise.
      eval_batch_size, chunk_steps: evaluation batch; steps per compiled chunk.
      scan_unroll: training steps unrolled inside a chunk's ``lax.scan`` (``chunk_steps``
        unrolls it fully). XLA on CPU runs convolutions inside a loop several times slower
        than outside one (AlexNet step: 180 ms vs 29 ms on 2 cores), so the conv configs
        unroll their (short) chunks; MLPs do not need it.
      vector_chunk: consolidation batches per vmapped call when RGO computes its curvature
        vectors (memory: this many batches' activations at once). It does not change the
        numbers, so it is left out of the run's fingerprint; lower it for large inputs.
      input_projection: the RGO methods and OWM project the dense layers' gradients on the
        input side, ``(P X^T) D`` inside the backward pass (:func:`rgo_jax.projected_matmul`):
        the same update as ``P (X^T D)``, far cheaper when the batch is smaller than the
        layer's width (wide layers, batch 10). Conv kernels and biases are projected by the
        optimizer as usual.
      checkpoint, plots: write task-boundary checkpoints; draw PNG plots.
      keep_checkpoints: keep every task's checkpoint; by default only the last
        :data:`KEPT_CHECKPOINTS` per method and seed are kept (what resuming needs).
      method_options: method options, addressed per method family (``ewc.lambda``,
        ``gpm.threshold``, ``rgo.alpha``) or per preset (``rgo-alpha1.alpha`` overrides the
        preset's fixed value); the flat names of earlier versions (``ewc_lambda``...) are
        aliases (:data:`rgo_jax.bench._methods.OPTION_ALIASES`). An addressed option that
        none of ``methods`` has is an error. Stored under the earlier names where there is
        one (RGO's as the fields above), so that a configuration's fingerprint does not
        depend on the spelling.
    """

    benchmark: str = "permuted_digits"
    dataset: str | None = None
    stream: str | None = None
    classes_per_task: int | None = None
    methods: tuple[str, ...] = ("rgo", "sgd")
    model: str = "mlp"
    hidden: tuple[int, ...] | None = None
    width: int | None = None
    init: str = "lecun"
    init_scale: float = 1.0
    bias: bool = True
    normalize: tuple[float, float] | None = None
    num_tasks: int = 20
    steps_per_task: int = 1000
    batch_size: int = 10
    learning_rate: float = 0.1
    alpha: float = 0.01
    consolidation_batches: int = 1000
    rls_method: str = "block"
    seeds: tuple[int, ...] = (0,)
    data_dir: str | None = None
    max_train_per_task: int | None = None
    max_test_per_task: int | None = None
    subsample: str = "random"
    validation_fraction: float = 0.0
    first_task_identity: bool = True
    fel_seed: int = 0
    head: str = "masked"
    vmap_seeds: bool = True
    vmap_memory_gb: float = 4.0
    eval_batch_size: int = 1000
    chunk_steps: int = 100
    scan_unroll: int = 1
    vector_chunk: int = 50
    input_projection: bool = False
    checkpoint: bool = True
    keep_checkpoints: bool = False
    plots: bool = True
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        check_config(self)
        if self.dataset is not None:
            if self.stream not in STREAMS:
                raise ValueError(
                    f"dataset {self.dataset!r} needs stream one of {', '.join(STREAMS)}, "
                    f"got {self.stream!r}."
                )
        elif self.stream is not None:
            raise ValueError(f"stream {self.stream!r} needs a dataset (a name or an .npz path).")
        elif self.benchmark not in BENCHMARKS:
            raise ValueError(
                f"Unknown benchmark {self.benchmark!r}; valid: {', '.join(sorted(BENCHMARKS))}."
            )
        if self.classes_per_task is not None and (self.stream or "split") != "split":
            raise ValueError(
                f"classes_per_task applies to class splits, not to stream {self.stream!r}."
            )
        for m in self.methods:
            get_method(m)
        check_method_options(self.method_options, self.methods)
        self._store_aliased_options()
        if not self.methods:
            raise ValueError("methods is empty: name at least one (e.g. rgo,sgd).")
        for name in (
            "num_tasks",
            "steps_per_task",
            "batch_size",
            "consolidation_batches",
            "eval_batch_size",
            "chunk_steps",
            "scan_unroll",
            "vector_chunk",
        ):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not self.learning_rate > 0 or not self.alpha > 0:
            raise ValueError("learning_rate and alpha must be positive.")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be positive, got {self.init_scale!r}.")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ValueError(
                f"validation_fraction must be in [0, 1), got {self.validation_fraction}."
            )
        data.check_subsample(self.subsample)
        if self.rls_method not in ("block", "sequential"):
            raise ValueError(
                f"rls_method must be 'block' or 'sequential', got {self.rls_method!r}."
            )
        if not self.seeds:
            raise ValueError("seeds is empty.")
        if self.init not in models.INIT_SCHEMES:
            raise ValueError(
                f"init must be one of {', '.join(models.INIT_SCHEMES)}, got {self.init!r}."
            )
        if self.head not in ("masked", "multi"):
            raise ValueError(f"head must be 'masked' or 'multi', got {self.head!r}.")
        if not self.bias and self.model != "mlp":
            raise ValueError(f"bias = false applies to the MLP, not to model {self.model!r}.")
        if self.normalize is not None:  # a JSON list: stored as the tuple it stands for
            object.__setattr__(self, "normalize", tuple(self.normalize))
        for m in self.methods:  # each method's options pass their own checks
            self.method(m)

    def _store_aliased_options(self) -> None:
        """Stores each option under its earlier name (RGO's as the Config fields)."""
        options = dict(self.method_options)
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for old, new in OPTION_ALIASES.items():
            spellings = [k for k in (new, old) if k in options]
            if not spellings or spellings == [old] and old not in defaults:
                continue
            values = [options.pop(k) for k in spellings]
            if old not in defaults:  # a flat method option
                if len({json.dumps(v) for v in values}) > 1:
                    raise ValueError(f"method option {new!r} given twice: {values}.")
                options[old] = values[0]
                continue
            value = values[0]
            if isinstance(defaults[old], int) and isinstance(value, float) and value.is_integer():
                value = int(value)
            current = getattr(self, old)
            if len({json.dumps(v) for v in values}) > 1 or current not in (defaults[old], value):
                raise ValueError(
                    f"method option {new!r} given twice: {old} = {current!r} and {values}."
                )
            object.__setattr__(self, old, value)
        object.__setattr__(self, "method_options", options)

    def method(self, name: str) -> Method:
        """The method ``name`` with this configuration's options."""
        settings = {
            "rgo.alpha": self.alpha,
            "rgo.consolidation_batches": self.consolidation_batches,
            "rgo.rls_method": self.rls_method,
            **self.method_options,
        }
        return bind_options(name, settings)

    def run_info(self) -> RunInfo:
        """What the methods may know of this run."""
        return RunInfo(
            learning_rate=self.learning_rate,
            batch_size=self.batch_size,
            num_tasks=self.num_tasks,
            vector_chunk=self.vector_chunk,
            input_projection=self.input_projection,
            convolutional=self.model != "mlp",
        )

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """A hash of every key that changes the numbers (all but :data:`OUTPUT_KEYS`)."""
        d = self.to_dict()
        for k in OUTPUT_KEYS:
            d.pop(k)
        for k, v in ADDED_KEYS.items():
            if d[k] == v:
                d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Benchmarks
# --------------------------------------------------------------------------------------------


def _dataset(name: str, cfg: Config) -> data.Dataset:
    ds = data.load_digits() if name == "digits" else data.load_dataset(name, cfg.data_dir)
    if cfg.normalize is not None:
        mean, std = (np.float32(v) for v in cfg.normalize)
        ds = dataclasses.replace(
            ds, x_train=(ds.x_train - mean) / std, x_test=(ds.x_test - mean) / std
        )
    if cfg.validation_fraction > 0:
        ds = ds.split_validation(cfg.validation_fraction, seed=0)
    return ds


def _stream(builder, base: str, **options):
    """A benchmark: ``builder`` (a :mod:`rgo_jax.bench.data` stream) over the data set ``base``."""

    def build(cfg: Config, seed: int):
        if builder is data.permuted:
            options["first_task_identity"] = cfg.first_task_identity
        if cfg.classes_per_task is not None:
            if builder is not data.class_split:
                raise ValueError(f"classes_per_task applies to class splits, not to {base!r}.")
            options["classes_per_task"] = cfg.classes_per_task
        return builder(
            _dataset(base, cfg),
            cfg.num_tasks,
            seed,
            max_train_per_task=cfg.max_train_per_task,
            max_test_per_task=cfg.max_test_per_task,
            subsample=cfg.subsample,
            **options,
        )

    build.datasets = (base,)  # what it reads (for ``rgo-bench --list``)
    return build


_MULTI_DATASETS = ("mnist", "fashion_mnist", "cifar10", "notmnist", "svhn")


def _multi(cfg: Config, seed: int):
    names = list(_MULTI_DATASETS)
    found = []
    for n in names:
        try:
            found.append(_dataset(n, cfg))
        except (FileNotFoundError, ValueError):
            continue
    if len(found) < 2:
        raise FileNotFoundError(
            f"multi_dataset needs at least two of {names} under the data directory "
            f"({cfg.data_dir or data.default_data_dir()}); found {len(found)}."
        )
    return data.multi_dataset(
        found[: cfg.num_tasks],
        seed=seed,
        max_train_per_task=cfg.max_train_per_task,
        max_test_per_task=cfg.max_test_per_task,
        subsample=cfg.subsample,
    )


_multi.datasets = _MULTI_DATASETS


BENCHMARKS = {
    "permuted_digits": _stream(data.permuted, "digits"),
    "split_digits": _stream(data.class_split, "digits"),
    "permuted_mnist": _stream(data.permuted, "mnist"),
    "rotated_mnist": _stream(data.rotated, "mnist"),
    "split_mnist": _stream(data.class_split, "mnist"),
    "permuted_fashion_mnist": _stream(data.permuted, "fashion_mnist"),
    "split_cifar10": _stream(data.class_split, "cifar10"),
    "split_cifar100": _stream(data.class_split, "cifar100"),
    "split_miniimagenet": _stream(data.class_split, "miniimagenet"),
    "multi_dataset": _multi,
}


def register_benchmark(name: str, builder, *, datasets: tuple[str, ...] = ()) -> None:
    """Adds a benchmark that ``Config(benchmark=name)`` and ``rgo-bench --benchmark`` run.

    Args:
      name: the benchmark's name (a new one: the built-in ones cannot be replaced).
      builder: ``builder(cfg, seed) -> TaskStream``, the stream of one seed, e.g. a
        :mod:`rgo_jax.bench.data` stream over a loaded data set; it should honour
        ``cfg.num_tasks`` and may read ``cfg.max_train_per_task`` and the like.
      datasets: the data files it needs (what ``rgo-bench --list`` shows).

    Examples:
      >>> from rgo_jax.bench import data, register_benchmark, train
      >>> register_benchmark(
      ...     "split_digits_3", lambda cfg, seed: data.class_split(
      ...         data.load_digits(), cfg.num_tasks, seed, classes_per_task=3))
      >>> len(train.build_stream(train.Config(benchmark="split_digits_3", num_tasks=3), 0))
      3
      >>> del train.BENCHMARKS["split_digits_3"]  # unregistered again
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"benchmark name must be a non-empty string, got {name!r}.")
    if not callable(builder):
        raise TypeError(f"builder of benchmark {name!r} must be callable(cfg, seed).")
    if name in _BUILT_IN:
        raise ValueError(f"{name!r} is a built-in benchmark; register under another name.")
    builder.datasets = tuple(datasets)
    BENCHMARKS[name] = builder


_BUILT_IN = frozenset(BENCHMARKS)


def build_stream(cfg: Config, seed: int) -> data.TaskStream:
    """The task stream of ``cfg.benchmark`` (or ``cfg.dataset``) for one seed (multi-head
    if ``cfg.head``)."""
    try:
        if cfg.dataset is not None:
            stream = _stream(STREAMS[cfg.stream], cfg.dataset)(cfg, seed)
        else:
            stream = BENCHMARKS[cfg.benchmark](cfg, seed)
    except RunError:
        raise
    except ValueError as err:  # a data set or stream the inputs do not fit: an input error
        raise RunError(str(err)) from err
    if len(stream) < cfg.num_tasks and cfg.benchmark != "multi_dataset":
        raise RunError(f"{cfg.benchmark} has {len(stream)} tasks, fewer than {cfg.num_tasks}.")
    return MultiHead(stream) if cfg.head == "multi" else stream


# --------------------------------------------------------------------------------------------
# Model plumbing
# --------------------------------------------------------------------------------------------


def _build(cfg: Config, method: Method, stream: data.TaskStream, seed: int):
    kwargs: dict[str, Any] = {}
    if cfg.hidden is not None:
        if cfg.model not in ("mlp", "alexnet"):
            raise ValueError(f"hidden applies to the MLP and AlexNet, not to model {cfg.model!r}.")
        kwargs["hidden"] = tuple(cfg.hidden)
    elif cfg.width is not None:
        if cfg.model not in ("resnet18", "reduced_resnet18"):
            raise ValueError(f"width applies to the ResNets, not to model {cfg.model!r}.")
        kwargs["width"] = cfg.width
    if not cfg.bias:
        kwargs["bias"] = False
    model = models.build_model(
        cfg.model,
        num_classes=stream.num_classes,
        input_shape=stream.input_shape,
        fel=method.fel,
        fel_seed=cfg.fel_seed,
        seed=seed,
        init=cfg.init,
        init_scale=cfg.init_scale,
        **kwargs,
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.as_pure(params), rest


class _Net:
    """Functional view of an NNX model: ``logits(params, x, task)``."""

    def __init__(self, graphdef, rest):
        self.graphdef, self.rest = graphdef, rest

    def logits(self, params, x, task, projection=None):
        """Logits; with ``projection`` (path -> P) those dense layers project their grads."""
        model = nnx.merge(self.graphdef, params, self.rest)
        if projection is None:
            return model(x, task)
        with use_input_projection(model, projection):
            return model(x, task)

    def reduced_logits(self, params, x, task):
        """Logits whose kernel cotangents are pre-averaged: for curvature vectors only."""
        model = nnx.merge(self.graphdef, params, self.rest)
        with use_reduced_kernel_gradients(model):
            return model(x, task)

    def inputs(self, params, x, task):
        return nnx.merge(self.graphdef, params, self.rest)(x, task, return_inputs=True)[1]


def _masked_ce(logits, y, mask):
    z = jnp.where(mask, logits, _NEG)
    return optax.softmax_cross_entropy_with_integer_labels(z, y).mean()


def _make_chunk_fn(net: _Net, tx, method: Method, cfg: Config):
    """A ``lax.scan`` over a chunk of steps of one seed (vmapped and jitted by the caller)."""

    input_projected = cfg.input_projection and method.input_projectable

    def loss_fn(params, extra, x, y, mask, task, projection):
        loss = _masked_ce(net.logits(params, x, task, projection), y, mask)
        term = method.penalty(params, extra)
        if term is not None:
            loss = loss + term
        return loss

    def chunk(params, opt_state, extra, xs, ys, masks, tasks, idx, steps):
        # The chunk's batches are gathered before the loop, not inside its body: measured,
        # that saves a copy of the training set at run time (3.5 GB for joint training over
        # 20 permuted-MNIST tasks) with the same numbers.
        batches = (xs[idx], ys[idx], masks[idx], tasks[idx[:, 0]])

        def body(carry, inputs):
            params, opt_state = carry
            (x, y, mask, task), step = inputs
            if input_projected:  # the state the layers project with (OWM: inputs absorbed)
                opt_state, kwargs = method.before_gradient(
                    net, params, x, task, extra, step, opt_state
                )
            projection = opt_state if input_projected else None
            loss, grads = jax.value_and_grad(loss_fn)(params, extra, x, y, mask, task, projection)
            if not input_projected:
                kwargs = method.step_kwargs(net, params, x, task, extra, step)
            updates, opt_state = tx.update(grads, opt_state, params, **kwargs)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            body, (params, opt_state), (batches, steps), unroll=min(cfg.scan_unroll, len(steps))
        )
        return params, opt_state, losses

    return chunk


def _over_seeds(fn, num_seeds: int):
    """``fn`` over a leading seed axis: ``vmap`` for several seeds, a plain call for one.

    A vmapped convolution over per-seed kernels becomes a grouped convolution, which XLA
    runs markedly slower on CPU (AlexNet: 48 ms vs 29 ms a step for one seed), so a group
    of one seed drops the axis instead.
    """
    if num_seeds > 1:
        return jax.vmap(fn)

    def single(*args):
        out = fn(*jax.tree.map(lambda a: a[0], args))
        return jax.tree.map(lambda a: a[None], out)

    return single


@functools.cache
def _correct_fn(graphdef):
    """The jitted count of right answers for one network structure, shared by every run and
    method of the process whose network has it (the non-parameter state, e.g. FEL keys,
    is an argument, not a constant of the program)."""

    @jax.jit
    def correct(params, rest, x, y, mask, task):
        z = jnp.where(mask[None, :], _Net(graphdef, rest).logits(params, x, task), _NEG)
        return jnp.sum(jnp.argmax(z, axis=-1) == y)

    return correct


def _accuracy_fn(net: _Net):
    """``correct(params, x, y, mask, task)``: right answers of ``net`` on a batch."""
    correct = _correct_fn(net.graphdef)
    return lambda params, x, y, mask, task: correct(params, net.rest, x, y, mask, task)


def _evaluate(correct, params, x, y, mask, task, batch):
    """Accuracy over ``x`` in batches of exactly ``batch`` rows (one compiled shape).

    The last batch is padded with zero inputs labelled ``-1``, which no argmax equals, so
    the padding counts as neither right nor wrong; every call has the same shapes, so
    ``correct`` compiles once for all tasks, whatever their test-set sizes. The inputs go
    in as NumPy arrays: no per-shape conversion is compiled.
    """
    n = len(x)
    total = 0
    mask = np.asarray(mask)
    task = np.int32(task)
    for lo in range(0, n, batch):
        xb, yb = np.asarray(x[lo : lo + batch]), np.asarray(y[lo : lo + batch])
        if len(yb) < batch:
            xb = np.concatenate([xb, np.zeros((batch - len(yb), *xb.shape[1:]), xb.dtype)])
            yb = np.concatenate([yb, np.full(batch - len(yb), -1, yb.dtype)])
        total += int(correct(params, xb, yb, mask, task))
    return total / n


def _eval_rows(cfg: Config, lanes) -> int:
    """The one evaluation batch shape of a group: ``eval_batch_size`` or the largest test set."""
    largest = max(len(ln.test_split(j)[1]) for ln in lanes for j in range(ln.T))
    return max(1, min(cfg.eval_batch_size, largest))


def _train_rows(cfg: Config, method: Method, lanes) -> int | None:
    """Rows every task's training arrays are padded to, so that the chunk compiles once.

    The largest training set of the group's tasks where the stream records their sizes
    (``meta["train_sizes"]``: class splits, whose tasks differ in size), else ``None`` (no
    padding: the tasks of permuted and rotated streams have one size). Joint training's
    data grows with every task and is not padded (that would hold all tasks' data from the
    first task on). The step indices never reach the padding, so the numbers are the same.
    """
    if method.joint:
        return None
    sizes = [ln.stream.meta.get("train_sizes") for ln in lanes]
    if any(s is None for s in sizes):
        return None
    return max(int(n) for s, ln in zip(sizes, lanes, strict=True) for n in s[: ln.T])


def _pad_rows(a: np.ndarray, rows: int | None) -> np.ndarray:
    """``a`` with zero rows appended up to ``rows`` (unchanged when ``rows`` is ``None``)."""
    if rows is None or len(a) >= rows:
        return a
    out = np.zeros((rows, *a.shape[1:]), a.dtype)
    out[: len(a)] = a
    return out


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


class _Progress:
    """A tqdm bar over all steps of one (method, seed) with task, loss and ETA.

    ``enabled=None`` shows it only when stderr (where it is drawn) is a terminal, so that
    log files do not fill with ``\r``-joined bar updates.
    """

    def __init__(self, total: int, desc: str, initial: int = 0, enabled: bool | None = None):
        if enabled is None:
            enabled = sys.stderr.isatty()
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                mininterval=0.5,
            )
        except ImportError:  # pragma: no cover - tqdm is in the bench extra
            self.bar = None

    def update(self, n: int, **postfix):
        if self.bar is not None:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(n)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _task_arrays(stream, t, cfg: Config, method: Method):
    """Training inputs, labels, per-sample masks and per-sample task ids for task ``t``."""
    masks = stream.class_masks()
    if not method.joint:
        x, y = stream.get_split(t, "train")
        m = np.broadcast_to(masks[t], (len(y), stream.num_classes))
        return x, y, m, np.full(len(y), t, np.int32)
    # Joint training: every task so far. Each task is moved into one buffer and dropped at
    # once (``np.empty`` pages are committed as they are written), so the data is held about
    # once, not twice as a list of tasks and their concatenation.
    parts = [stream.get_split(k, "train") for k in range(t + 1)]
    sizes = [len(yk) for _, yk in parts]
    x = np.empty((sum(sizes), *parts[0][0].shape[1:]), parts[0][0].dtype)
    y = np.concatenate([yk for _, yk in parts])
    m = np.repeat(masks[: t + 1], sizes, axis=0)
    ids = np.repeat(np.arange(t + 1, dtype=np.int32), sizes)
    lo = 0
    for k, n in enumerate(sizes):
        x[lo : lo + n] = parts[k][0]
        parts[k] = None
        lo += n
    return x, y, m, ids


def _step_indices(n: int, steps: int, batch: int, seed: int, t: int) -> np.ndarray:
    """Epoch-shuffled sample indices ``[steps, batch]`` from a (seed, task)-keyed RNG."""
    rng = np.random.default_rng([seed, t, 1])
    need = steps * batch
    order = np.concatenate([rng.permutation(n) for _ in range(math.ceil(need / n))])
    return order[:need].reshape(steps, batch)


@jax.jit
def _stack(trees):
    """The trees stacked leaf by leaf on a new leading axis (one compiled call per tree)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.partial(jax.jit, static_argnums=1)
def _unstack(tree, i):
    """Entry ``i`` of every leaf's leading axis (one compiled call per tree)."""
    return jax.tree.map(lambda x: x[i], tree)


class _Lane:
    """One seed's stream, results and checkpoints inside a group of seeds run together."""

    def __init__(self, cfg: Config, method: Method, seed: int, workdir: Path, stream=None):
        self.seed = seed
        self.stream = build_stream(cfg, seed) if stream is None else stream
        self.T = min(cfg.num_tasks, len(self.stream))
        self.graphdef, self.params0, self.rest = _build(cfg, method, self.stream, seed)
        self.masks = self.stream.class_masks()
        self.R = np.full((self.T, self.T), np.nan)
        self.per_task: list = []
        self.ckpt_root = checkpoint_root(workdir, method.name, seed)
        self._test: dict = {}

    def test_split(self, j):
        if j not in self._test:
            self._test[j] = self.stream.get_split(j, "test")
        return self._test[j]


def _seed_groups(
    cfg: Config, method: Method, streams: dict | None = None, log=print
) -> list[tuple[int, ...]]:
    """Seeds batched by ``vmap`` as far as their training data fits ``vmap_memory_gb``.

    The size is measured on the first seed's stream, which is left in ``streams`` for its
    lane (so that it is built once).
    """
    if not cfg.vmap_seeds:
        return [(s,) for s in cfg.seeds]
    streams = {} if streams is None else streams
    if cfg.seeds[0] not in streams:
        streams[cfg.seeds[0]] = build_stream(cfg, cfg.seeds[0])
    stream = streams[cfg.seeds[0]]
    x, _ = stream.get_split(0, "train")
    per_seed = x.nbytes * (min(cfg.num_tasks, len(stream)) if method.joint else 1)
    k = max(1, int(cfg.vmap_memory_gb * 2**30 // max(per_seed, 1)))
    groups, built = [], {}
    for run in _same_task_sizes(cfg, streams, built, log):
        groups += [run[i : i + k] for i in range(0, len(run), k)]
    streams.update(built)  # taken by their lanes: each stream is built once
    return groups


def _same_task_sizes(cfg: Config, streams: dict, built: dict, log=print) -> list[tuple[int, ...]]:
    """``cfg.seeds`` cut into consecutive runs whose tasks have the same training sizes.

    Seeds are stacked under ``vmap``, which needs equal shapes: a class split of classes
    of unequal sizes draws other classes, so other task sizes, for each seed. Streams that
    record no ``train_sizes`` (permuted, rotated: the same sizes for every seed) are one run.
    The other seeds' streams built to read their sizes are left in ``built``.
    """
    first = streams[cfg.seeds[0]]
    if "train_sizes" not in first.meta or len(cfg.seeds) == 1:
        return [tuple(cfg.seeds)]
    T = min(cfg.num_tasks, len(first))
    sizes = [tuple(first.meta["train_sizes"][:T])]
    for s in cfg.seeds[1:]:  # lazily built streams: the sizes are known without the data
        built[s] = build_stream(cfg, s)
        sizes.append(tuple(built[s].meta["train_sizes"][:T]))
    runs = [[cfg.seeds[0]]]
    for i in range(1, len(cfg.seeds)):
        if sizes[i] == sizes[i - 1]:
            runs[-1].append(cfg.seeds[i])
        else:
            runs.append([cfg.seeds[i]])
    if len(runs) > 1:
        log(
            f"rgo-bench: the seeds' tasks differ in size (a class split of classes of unequal "
            f"sizes), so they are vmapped in groups of equal sizes: "
            f"{' | '.join(','.join(map(str, r)) for r in runs)}."
        )
    return [tuple(r) for r in runs]


def _resume_point(cfg: Config, lanes: list[_Lane], log=print) -> int:
    """The first task that every seed of the group still has to train."""
    if not cfg.checkpoint:
        return 0
    done = []
    for lane in lanes:
        found = latest_good_checkpoint(lane.ckpt_root, log=log)
        if found is None:
            return 0
        if found[1].get("fingerprint") != cfg.fingerprint():
            raise RunError(
                f"Checkpoint {found[0]} was written by a different configuration; use a new "
                "output directory (or delete the old one) to start afresh."
            )
        done.append(found[1]["task"])
    return min(done) + 1


@dataclasses.dataclass
class _Group:
    """A group of seeds trained in lockstep: their lanes and what they share."""

    cfg: Config
    method: Method
    lanes: list[_Lane]
    net: _Net
    tx: Any
    run_info: RunInfo
    correct: Any
    eval_rows: int
    train_rows: int | None

    @property
    def T(self) -> int:
        return self.lanes[0].T

    def fresh_state(self):
        """Stacked initial ``(params, opt_state, extra)`` of every lane."""
        lanes, method = self.lanes, self.method
        return (
            _stack([ln.params0 for ln in lanes]),
            _stack([self.init_opt_state(ln.params0) for ln in lanes]),
            _stack([method.init_extra(ln.params0, ln.stream, self.run_info) for ln in lanes]),
        )

    @functools.cached_property
    def init_opt_state(self):
        """``tx.init`` compiled as one call (not one small compile per P's identity)."""
        return jax.jit(self.tx.init)

    def accuracy(self, lane: _Lane, params, j: int) -> float:
        """Test accuracy of ``params`` on task ``j`` of ``lane``."""
        x, y = lane.test_split(j)
        return _evaluate(self.correct, params, x, y, lane.masks[j], j, self.eval_rows)


def _set_up_lanes(cfg, method, seeds, workdir, streams) -> _Group:
    """Step 1: each seed's stream, network and result slots; the shared optimizer."""
    lanes = [_Lane(cfg, method, s, workdir, streams.pop(s, None)) for s in seeds]
    net = _Net(lanes[0].graphdef, lanes[0].rest)
    run_info = cfg.run_info()
    return _Group(
        cfg,
        method,
        lanes,
        net,
        method.optimizer(run_info),
        run_info,
        _accuracy_fn(net),
        _eval_rows(cfg, lanes),
        _train_rows(cfg, method, lanes),
    )


def _resume(group: _Group, state, log):
    """Step 2: the first task to train, and the state restored from the checkpoints."""
    start = _resume_point(group.cfg, group.lanes, log)
    if start == 0:
        return 0, state
    params, opt_state, extra = state
    restored = []
    for i, ln in enumerate(group.lanes):
        path = ln.ckpt_root / f"task_{start - 1:03d}"
        meta = json.loads((path / "meta.json").read_text())
        template = {
            "params": ln.params0,
            "opt_state": _unstack(opt_state, i),
            "extra": _unstack(extra, i),
            "per_task": [ln.params0] * meta["per_task"],
        }
        restored.append(restore_checkpoint(path, template))
        ln.per_task = list(restored[-1]["per_task"])
        ln.R = np.array(meta["R"], dtype=np.float64)
        log(f"[{group.method.name} seed {ln.seed}] resumed after task {start - 1} from {path}")
    return start, tuple(_stack([s[k] for s in restored]) for k in ("params", "opt_state", "extra"))


def _train_task(group: _Group, chunk_fn, t: int, arrays, state, progress):
    """Step 3: ``steps_per_task`` SGD steps of task ``t`` for every lane at once."""
    cfg = group.cfg
    params, opt_state, extra = state
    shapes = {tuple(a[0].shape) for a in arrays}
    if len(shapes) > 1:  # a registered stream of per-seed task sizes, not recorded
        raise RunError(
            f"[{group.method.name}] task {t}: the seeds' training sets differ in shape "
            f"({sorted(shapes)}), so they cannot be trained together; rerun with "
            "--no-vmap-seeds (or record the stream's meta['train_sizes'])."
        )
    idx = np.stack(
        [
            _step_indices(len(a[1]), cfg.steps_per_task, cfg.batch_size, ln.seed, t)
            for a, ln in zip(arrays, group.lanes, strict=True)
        ]
    )
    # One seed: a view, not a stacked copy (joint training's data is GBs); device_put
    # copies once, where jnp.asarray holds a second transient copy on CPU. Tasks of other
    # sizes are padded to one size (``train_rows``), so that the chunk compiles once.
    dx, dy, dm, dt = (
        jax.device_put(
            np.stack([_pad_rows(a, group.train_rows) for a in col])
            if len(col) > 1
            else _pad_rows(col[0], group.train_rows)[None]
        )
        for col in zip(*arrays, strict=True)
    )
    _profile.lap("train", t)
    idx = idx.astype(np.int32)
    for lo in range(0, cfg.steps_per_task, cfg.chunk_steps):
        sl = idx[:, lo : lo + cfg.chunk_steps]  # NumPy in: nothing compiled to convert them
        steps = np.broadcast_to(np.arange(lo, lo + sl.shape[1], dtype=np.int32), sl.shape[:2])
        params, opt_state, losses = chunk_fn(params, opt_state, extra, dx, dy, dm, dt, sl, steps)
        losses = np.asarray(losses)
        check_finite_losses(losses, group.method.name, tuple(ln.seed for ln in group.lanes), t, lo)
        progress.update(int(sl.shape[1]), task=t, loss=f"{float(losses[:, -1].mean()):.3f}")
    return params, opt_state


def _task_context(group: _Group, t: int, lane: _Lane, arrays, rng, wait=None) -> TaskContext:
    return TaskContext(
        task=t,
        x_train=arrays[0],
        y_train=arrays[1],
        class_mask=lane.masks[t],
        logits_fn=group.net.logits,
        inputs_fn=group.net.inputs,
        curvature_logits_fn=group.net.reduced_logits,
        rng=rng,
        run=group.run_info,
        **({} if wait is None else {"wait_compiled": wait}),
    )


class _CompileAhead:
    """:meth:`Method.compile_ahead` of the first task's boundary in a background thread.

    Started before the first task trains, so that the task boundary's compilation (RGO's
    RLS update: seconds) overlaps the training instead of following it. It only compiles:
    the state it sees is the initial one, its ``rng`` is its own, and a failure is ignored
    (the task's end then compiles as it would have).
    """

    def __init__(self, group: _Group, t: int, lane: _Lane, arrays, state):
        ctx = _task_context(group, t, lane, arrays, np.random.default_rng(0))
        params, opt_state, extra = (_unstack(x, 0) for x in state)
        self.thread = threading.Thread(
            target=self._run,
            args=(group.method, ctx, params, opt_state, extra),
            name="rgo-bench-compile-ahead",
            daemon=True,
        )
        self.thread.start()

    @staticmethod
    def _run(method, ctx, params, opt_state, extra) -> None:
        try:
            method.compile_ahead(ctx, params, opt_state, extra)
        except Exception:  # noqa: BLE001 - only a head start; the real call compiles anyway
            pass

    def wait(self) -> None:
        self.thread.join()


def _end_task(group: _Group, t: int, lane: _Lane, arrays, params, opt_state, extra, ahead=None):
    """Step 4: one lane's task-boundary work (the method's), returning its new state.

    ``ahead``: a :class:`_CompileAhead` to wait for before the compiled calls it covers.
    """
    rng = np.random.default_rng([lane.seed, t, 2])
    ctx = _task_context(group, t, lane, arrays, rng, None if ahead is None else ahead.wait)
    try:
        opt_state, extra = group.method.after_task(ctx, params, opt_state, extra)
    finally:
        if ahead is not None:
            ahead.wait()
    del ctx
    check_finite_state(
        {"params": params, "opt_state": opt_state, "extra": extra}, group.method.name, lane.seed, t
    )
    if group.method.fresh_network_per_task:
        lane.per_task.append(params)
    return opt_state, extra


def _evaluate_task(group: _Group, t: int, lane: _Lane, params) -> None:
    """Step 5: row ``t`` of the lane's accuracy matrix (and the next task's zero-shot)."""
    for j in range(min(t + 2, group.T)):
        pj = lane.per_task[j] if (group.method.fresh_network_per_task and j <= t) else params
        lane.R[t, j] = group.accuracy(lane, pj, j)


class _Writer:
    """Checkpoints and reports written by one background thread, in the order submitted.

    Writing is off the training's critical path, and one thread keeps every write in order:
    a lane's checkpoint is complete (and the older ones pruned) before its next one starts,
    and each report follows the checkpoints submitted before it. A checkpoint still counts
    only once its ``meta.json`` is written last (:func:`save_checkpoint`), so a process killed
    mid-write leaves no checkpoint that looks complete. :meth:`close` waits for everything
    and raises the first error; :meth:`submit` raises it as soon as it is known.
    """

    def __init__(self):
        self.pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rgo-bench-write")
        self.pending: list[concurrent.futures.Future] = []

    def _raise_finished(self) -> None:
        done = [f for f in self.pending if f.done()]
        self.pending = [f for f in self.pending if not f.done()]
        for f in done:
            f.result()

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        self._raise_finished()
        future = self.pool.submit(fn, *args, **kwargs)
        self.pending.append(future)
        return future

    def close(self) -> None:
        try:
            for f in self.pending:
                f.result()
        finally:
            self.pending = []
            self.pool.shutdown(wait=True)


def _write_checkpoint(root: Path, t: int, state: dict, meta: dict, keep_all: bool) -> None:
    save_checkpoint(root / f"task_{t:03d}", state, meta)
    if not keep_all:
        prune_checkpoints(root, KEPT_CHECKPOINTS)


def _save_task(group: _Group, t: int, lane: _Lane, params, opt_state, extra, writer=None) -> None:
    """The lane's checkpoint after task ``t`` (with its results so far).

    With a :class:`_Writer`, written in its thread: the arrays are this task's own (not
    donated to a later step), and the results and per-task list are copied here.
    """
    if not group.cfg.checkpoint:
        return
    state = {"params": params, "opt_state": opt_state, "extra": extra, "per_task": lane.per_task}
    meta = {
        "task": t,
        "seed": lane.seed,
        "method": group.method.name,
        "R": lane.R.tolist(),
        "per_task": len(lane.per_task),
        "fingerprint": group.cfg.fingerprint(),
        "rng": {"kind": "numpy default_rng keyed by [seed, task, stream]", "seed": lane.seed},
    }
    args = (lane.ckpt_root, t, state, meta, group.cfg.keep_checkpoints)
    if writer is None:
        _write_checkpoint(*args)
    else:
        state["per_task"] = list(lane.per_task)
        writer.submit(_write_checkpoint, *args)


def _run_group(
    cfg: Config,
    method: Method,
    seeds: tuple[int, ...],
    workdir: Path,
    log,
    streams=None,
    show_progress=None,
    writer=None,
):
    """Trains ``seeds`` in lockstep, the training steps ``vmap``-ed over the seed axis.

    Yields ``(t, lanes, random_init)`` after every task. Consolidation, evaluation and
    checkpoints are per seed (one checkpoint directory per seed, as in a sequential run).
    ``streams`` may hold already built streams by seed (each is taken by its lane);
    ``writer``: a :class:`_Writer` for the checkpoints (else they are written here).
    """
    _profile.lap("setup (data, model)")
    group = _set_up_lanes(cfg, method, seeds, workdir, {} if streams is None else streams)
    lanes, T = group.lanes, group.T
    state = group.fresh_state()
    _profile.lap("evaluation (initial)")
    random_init = [np.array([group.accuracy(ln, ln.params0, j) for j in range(T)]) for ln in lanes]
    start, state = _resume(group, state, log)
    if start >= T:  # finished earlier: report the restored results
        if cfg.checkpoint and not cfg.keep_checkpoints:  # e.g. all kept by an older version
            for ln in lanes:
                prune_checkpoints(ln.ckpt_root, KEPT_CHECKPOINTS)
        yield T - 1, lanes, random_init
        return
    # Params and optimizer state are donated: the step updates P-sized buffers in place.
    chunk_fn = jax.jit(
        _over_seeds(_make_chunk_fn(group.net, group.tx, method, cfg), len(seeds)),
        donate_argnums=(0, 1),
    )
    label = ",".join(map(str, seeds))
    progress = _Progress(
        T * cfg.steps_per_task,
        f"{method.name} s{label}",
        initial=start * cfg.steps_per_task,
        enabled=show_progress,
    )
    for t in range(start, T):
        if method.fresh_network_per_task and t > 0:
            state = group.fresh_state()
        _profile.lap("data", t)
        arrays = [_task_arrays(ln.stream, t, cfg, method) for ln in lanes]
        ahead = _CompileAhead(group, t, lanes[0], arrays[0], state) if t == start else None
        params, opt_state = _train_task(group, chunk_fn, t, arrays, state, progress)
        extra = state[2]
        new_opt, new_extra = [], []
        for i, ln in enumerate(lanes):
            p_i, o_i, e_i = _unstack(params, i), _unstack(opt_state, i), _unstack(extra, i)
            _profile.lap("task boundary", t)
            o_i, e_i = _end_task(group, t, ln, arrays[i], p_i, o_i, e_i, ahead)
            ahead = None
            _profile.lap("evaluation", t)
            _evaluate_task(group, t, ln, p_i)
            _profile.lap("checkpoint", t)
            _save_task(group, t, ln, p_i, o_i, e_i, writer)
            new_opt.append(o_i)
            new_extra.append(e_i)
        # Drop this task's training data before the next task's is built (joint training:
        # otherwise both tasks' GBs are held at once).
        del arrays
        state = (params, _stack(new_opt), _stack(new_extra))
        yield t, lanes, random_init
    progress.close()


def _fixed_option_notes(cfg: Config) -> list[str]:
    """A line for each chosen preset that keeps its own value of a family-level option."""
    notes = []
    for name in cfg.methods:
        method = cfg.method(name)
        if not method.fixed or method.family not in METHODS:
            continue
        general = cfg.method(method.family).options  # the family's preset of its own name
        for field in method.fixed:
            mine, other = getattr(method.options, field), getattr(general, field)
            if other != mine and f"{name}.{field}" not in cfg.method_options:
                notes.append(
                    f"[{name}] {field} = {mine!r}, fixed by the preset: {method.family}.{field} "
                    f"= {other!r} applies to the other {method.family} methods; "
                    f"set {name}.{field} to change it."
                )
    return notes


def run(
    cfg: Config, workdir: str | Path, *, log=print, progress: bool | None = None
) -> dict[str, Any]:
    """Runs every method and seed of ``cfg``; writes and returns the results.

    Results are rewritten after every task, so a partial run has a valid ``summary.md``;
    rerunning the same command on the same ``workdir`` resumes from the checkpoints.
    ``progress``: draw a progress bar on stderr (``None``: only if stderr is a terminal).

    A run that fails before writing anything (e.g. its data set is not found) removes the
    folders it created. Task checkpoints are pruned to the last :data:`KEPT_CHECKPOINTS` per
    method and seed unless ``cfg.keep_checkpoints``.

    Returns:
      ``{"summaries": {method: summary}, "matrices": {method: [R per seed]}}``.
    """
    workdir = Path(workdir)
    with removed_if_left_empty(workdir):
        return _run(cfg, workdir, log=log, progress=progress)


def _run(cfg: Config, workdir: Path, *, log, progress) -> dict[str, Any]:
    previous = prepare_run_dir(cfg, workdir)
    config = {
        **cfg.to_dict(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "scenario": _report.SCENARIO,
    }
    for note in _fixed_option_notes(cfg):
        log(note)
    writer = _Writer()  # checkpoints and reports: written while the next task trains
    try:
        matrices, report = _train_and_report(cfg, workdir, previous, config, writer, log, progress)
    finally:
        writer.close()  # everything written (or the first error raised) before returning
    summaries = {} if report is None else report.result()
    log("\n" + _report.summary_table(summaries) + "\n" + _plot_style.FORGETTING_NOTE)
    return {"summaries": summaries, "matrices": matrices}


def _train_and_report(cfg: Config, workdir: Path, previous, config, writer: _Writer, log, progress):
    """Every method and seed group; returns the matrices and the last report's future."""
    matrices: dict[str, list] = {m: [] for m in cfg.methods}
    random_init: dict[str, list] = {m: [] for m in cfg.methods}
    report = None
    for name in cfg.methods:
        method = cfg.method(name)
        streams: dict = {}  # built by _seed_groups, taken by the lanes: once per seed
        groups = _seed_groups(cfg, method, streams, log)
        for seeds in [
            g for s in groups for g in split_by_resume_point(s, workdir, cfg, method.name, log)
        ]:
            t0 = time.time()
            slots = []
            for _ in seeds:
                slots.append(len(matrices[name]))
                matrices[name].append(None)
                random_init[name].append(None)
            lanes: list[_Lane] = []
            for t, lanes, b in _run_group(
                cfg, method, seeds, workdir, log, streams, progress, writer
            ):
                for slot, ln, b_i in zip(slots, lanes, b, strict=True):
                    matrices[name][slot] = ln.R[: t + 1, : t + 1].copy()
                    random_init[name][slot] = b_i
                _profile.lap("report", t)
                report = writer.submit(
                    write_report,
                    workdir,
                    previous,
                    cfg.seeds,
                    lanes[0].T,
                    config=config,
                    matrices={k: list(v) for k, v in matrices.items() if v and v[0] is not None},
                    random_init={
                        k: np.stack(v) for k, v in random_init.items() if v and v[0] is not None
                    },
                    plots=cfg.plots and t == lanes[0].T - 1,
                )
            for slot, seed in zip(slots, seeds, strict=True):
                log(f"\n[{name} seed {seed}] accuracy matrix ({time.time() - t0:.1f} s)")
                log(_report.format_matrix(matrices[name][slot]))
    return matrices, report
