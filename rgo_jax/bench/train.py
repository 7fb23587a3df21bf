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

import dataclasses
import hashlib
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from rgo_jax._fast_curvature import use_reduced_kernel_gradients
from rgo_jax._input_projection import input_projection_matrices, use_input_projection
from rgo_jax.bench import _report, data, models
from rgo_jax.bench._checkpoint import latest_checkpoint, restore_checkpoint, save_checkpoint
from rgo_jax.bench._methods import (
    METHODS,
    Method,
    TaskContext,
    check_method_options,
    get_method,
)

__all__ = [
    "ADDED_KEYS",
    "BENCHMARKS",
    "MERGE_FREE_KEYS",
    "OUTPUT_KEYS",
    "Config",
    "build_stream",
    "run",
]

#: :class:`Config` keys that never change a run's numbers (what runs, where, what is
#: written, memory chunking); left out of the checkpoint fingerprint.
OUTPUT_KEYS = ("methods", "seeds", "data_dir", "plots", "checkpoint", "vector_chunk")
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
ADDED_KEYS = {"init": "lecun", "init_scale": 1.0}

_NEG = -1e9  # masked logits (the reference code's "large negative value")


@dataclasses.dataclass(frozen=True)
class Config:
    """One experiment. Defaults are the paper's MNIST protocol (Table 1).

    Attributes:
      benchmark: a key of :data:`BENCHMARKS` (``permuted_mnist``, ``split_cifar100``...).
      methods: method names (``rgo-bench --list``); each gets the same data, seeds, steps.
      model, hidden, width: the network: ``hidden`` the MLP's hidden widths (default 256,
        256) or AlexNet's ``fc1``/``fc2`` widths (default 2048, 2048); ``width`` for ResNets.
      init: the parameter initialisation, a key of :data:`rgo_jax.bench.models.INIT_SCHEMES`:
        ``lecun`` (Flax's default), ``torch`` or ``glorot``; ``init_scale`` multiplies every
        initial kernel. Both change how much RGO forgets (``benchmarks/REPRODUCIBILITY.md``).
      num_tasks, steps_per_task, batch_size, learning_rate: the training budget (SGD).
      alpha, consolidation_batches, rls_method: RGO's regulariser, the number of batches
        of its consolidation pass, and the RLS kernel (``block`` or ``sequential``).
      seeds: seeds of data order, permutations and initialisation.
      data_dir: folder of the data sets (else ``$RGO_DATA_DIR``, then ``~/.cache/rgo_jax``).
      max_train_per_task, max_test_per_task: optional subsampling for quick runs.
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
      input_projection: the RGO methods project the dense layers' gradients on the input
        side, ``(P X^T) D`` inside the backward pass (:func:`rgo_jax.projected_matmul`):
        the same update as ``P (X^T D)``, far cheaper when the batch is smaller than the
        layer's width (wide layers, batch 10). Conv kernels and biases are projected by the
        optimizer as usual.
      checkpoint, plots: write task-boundary checkpoints; draw PNG plots.
      method_options: method hyperparameters (``ewc_lambda``, ``gpm_threshold``...).
    """

    benchmark: str = "permuted_digits"
    methods: tuple[str, ...] = ("rgo", "sgd")
    model: str = "mlp"
    hidden: tuple[int, ...] | None = None
    width: int | None = None
    init: str = "lecun"
    init_scale: float = 1.0
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
    plots: bool = True
    method_options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.benchmark not in BENCHMARKS:
            raise ValueError(
                f"Unknown benchmark {self.benchmark!r}; valid: {', '.join(sorted(BENCHMARKS))}."
            )
        for m in self.methods:
            get_method(m)
        check_method_options(self.method_options)
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
    if cfg.validation_fraction > 0:
        ds = ds.split_validation(cfg.validation_fraction, seed=0)
    return ds


def _stream(builder, base: str, **options):
    """A benchmark: ``builder`` (a :mod:`rgo_jax.bench.data` stream) over the data set ``base``."""

    def build(cfg: Config, seed: int):
        if builder is data.permuted:
            options["first_task_identity"] = cfg.first_task_identity
        return builder(
            _dataset(base, cfg),
            cfg.num_tasks,
            seed,
            max_train_per_task=cfg.max_train_per_task,
            max_test_per_task=cfg.max_test_per_task,
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
    return data.multi_dataset(found[: cfg.num_tasks])


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


class _MultiHead:
    """A stream whose tasks get disjoint output units: task ``t``'s labels move by ``t * C``.

    With the masked loss this is the multi-head setting (one head per task); for streams
    whose tasks already have disjoint classes (class splits) it changes nothing.
    """

    def __init__(self, stream: data.TaskStream):
        self.stream = stream
        classes = [stream.task_classes(t) for t in range(len(stream))]
        overlap = len(np.unique(np.concatenate(classes))) < sum(len(c) for c in classes)
        self.offset = stream.num_classes if overlap else 0
        self.num_classes = stream.num_classes + self.offset * (len(stream) - 1)
        self.input_shape = stream.input_shape

    def __len__(self):
        return len(self.stream)

    def class_masks(self) -> np.ndarray:
        masks = np.zeros((len(self), self.num_classes), bool)
        for t in range(len(self)):
            masks[t, self.stream.task_classes(t) + t * self.offset] = True
        return masks

    def get_split(self, t: int, split: str):
        x, y = self.stream.get_split(t, split)
        return x, y + np.int32(t * self.offset)


def build_stream(cfg: Config, seed: int) -> data.TaskStream:
    """The task stream of ``cfg.benchmark`` for one seed (multi-head if ``cfg.head``)."""
    stream = BENCHMARKS[cfg.benchmark](cfg, seed)
    if len(stream) < cfg.num_tasks and cfg.benchmark != "multi_dataset":
        raise ValueError(f"{cfg.benchmark} has {len(stream)} tasks, fewer than {cfg.num_tasks}.")
    return _MultiHead(stream) if cfg.head == "multi" else stream


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
        if not projection:
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
        if method.penalty is not None:
            loss = loss + method.penalty(params, extra, cfg)
        return loss

    def chunk(params, opt_state, extra, xs, ys, masks, tasks, idx, steps):
        # The chunk's batches are gathered before the loop, not inside its body: measured,
        # that saves a copy of the training set at run time (3.5 GB for joint training over
        # 20 permuted-MNIST tasks) with the same numbers.
        batches = (xs[idx], ys[idx], masks[idx], tasks[idx[:, 0]])

        def body(carry, inputs):
            params, opt_state = carry
            (x, y, mask, task), step = inputs
            projection = (
                input_projection_matrices(opt_state, models.LINEAR_KERNELS)
                if input_projected
                else None
            )
            loss, grads = jax.value_and_grad(loss_fn)(params, extra, x, y, mask, task, projection)
            kwargs = {}
            if method.step_kwargs is not None:
                kwargs = method.step_kwargs(net, params, x, task, cfg, extra, step)
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


def _accuracy_fn(net: _Net):
    @jax.jit
    def correct(params, x, y, mask, task):
        z = jnp.where(mask[None, :], net.logits(params, x, task), _NEG)
        return jnp.sum(jnp.argmax(z, axis=-1) == y)

    return correct


def _evaluate(correct, params, x, y, mask, task, batch):
    n = len(x)
    total = 0
    for lo in range(0, n, batch):
        total += int(
            correct(
                params,
                jnp.asarray(x[lo : lo + batch]),
                jnp.asarray(y[lo : lo + batch]),
                jnp.asarray(mask),
                jnp.int32(task),
            )
        )
    return total / n


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


def _stack(trees):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _unstack(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


class _Lane:
    """One seed's stream, results and checkpoints inside a group of seeds run together."""

    def __init__(self, cfg: Config, method: Method, seed: int, workdir: Path):
        self.seed = seed
        self.stream = build_stream(cfg, seed)
        self.T = min(cfg.num_tasks, len(self.stream))
        self.graphdef, self.params0, self.rest = _build(cfg, method, self.stream, seed)
        self.masks = self.stream.class_masks()
        self.R = np.full((self.T, self.T), np.nan)
        self.per_task: list = []
        self.ckpt_root = workdir / "checkpoints" / method.name / f"seed{seed}"
        self._test: dict = {}

    def test_split(self, j):
        if j not in self._test:
            self._test[j] = self.stream.get_split(j, "test")
        return self._test[j]


def _seed_groups(cfg: Config, method: Method) -> list[tuple[int, ...]]:
    """Seeds batched by ``vmap`` as far as their training data fits ``vmap_memory_gb``."""
    if not cfg.vmap_seeds:
        return [(s,) for s in cfg.seeds]
    stream = build_stream(cfg, cfg.seeds[0])
    x, _ = stream.get_split(0, "train")
    per_seed = x.nbytes * (min(cfg.num_tasks, len(stream)) if method.joint else 1)
    k = max(1, int(cfg.vmap_memory_gb * 2**30 // max(per_seed, 1)))
    return [tuple(cfg.seeds[i : i + k]) for i in range(0, len(cfg.seeds), k)]


def _resume_point(cfg: Config, lanes: list[_Lane]) -> int:
    """The first task that every seed of the group still has to train."""
    if not cfg.checkpoint:
        return 0
    done = []
    for lane in lanes:
        found = latest_checkpoint(lane.ckpt_root)
        if found is None:
            return 0
        if found[1].get("fingerprint") != cfg.fingerprint():
            raise ValueError(
                f"Checkpoint {found[0]} was written by a different configuration; use a new "
                "output directory (or delete the old one) to start afresh."
            )
        done.append(found[1]["task"])
    return min(done) + 1


def _run_group(
    cfg: Config, method: Method, seeds: tuple[int, ...], workdir: Path, log, show_progress=None
):
    """Trains ``seeds`` in lockstep, the training steps ``vmap``-ed over the seed axis.

    Yields ``(t, lanes, random_init)`` after every task. Consolidation, evaluation and
    checkpoints are per seed (one checkpoint directory per seed, as in a sequential run).
    """
    lanes = [_Lane(cfg, method, seed, workdir) for seed in seeds]
    T = lanes[0].T
    net = _Net(lanes[0].graphdef, lanes[0].rest)
    tx = method.make_tx(cfg)
    correct = _accuracy_fn(net)

    def fresh():
        return (
            _stack([ln.params0 for ln in lanes]),
            _stack([tx.init(ln.params0) for ln in lanes]),
            _stack([method.init_extra(ln.params0, cfg, ln.stream) for ln in lanes]),
        )

    params, opt_state, extra = fresh()
    random_init = [
        np.array(
            [
                _evaluate(
                    correct, ln.params0, *ln.test_split(j), ln.masks[j], j, cfg.eval_batch_size
                )
                for j in range(T)
            ]
        )
        for ln in lanes
    ]
    start = _resume_point(cfg, lanes)
    if start > 0:
        restored = []
        for i, ln in enumerate(lanes):
            path = ln.ckpt_root / f"task_{start - 1:03d}"
            meta = json.loads((path / "meta.json").read_text())
            template = {
                "params": ln.params0,
                "opt_state": _unstack(opt_state, i),
                "extra": _unstack(extra, i),
                "per_task": [ln.params0] * meta["per_task"],
            }
            state = restore_checkpoint(path, template)
            restored.append(state)
            ln.per_task = list(state["per_task"])
            ln.R = np.array(meta["R"], dtype=np.float64)
            log(f"[{method.name} seed {ln.seed}] resumed after task {start - 1} from {path}")
        params = _stack([s["params"] for s in restored])
        opt_state = _stack([s["opt_state"] for s in restored])
        extra = _stack([s["extra"] for s in restored])

    if start >= T:  # finished earlier: report the restored results
        yield T - 1, lanes, random_init
        return
    # Params and optimizer state are donated: the step updates P-sized buffers in place.
    chunk_fn = jax.jit(
        _over_seeds(_make_chunk_fn(net, tx, method, cfg), len(seeds)), donate_argnums=(0, 1)
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
            params, opt_state, extra = fresh()
        arrays = [_task_arrays(ln.stream, t, cfg, method) for ln in lanes]
        idx = np.stack(
            [
                _step_indices(len(a[1]), cfg.steps_per_task, cfg.batch_size, ln.seed, t)
                for a, ln in zip(arrays, lanes, strict=True)
            ]
        )
        # One seed: a view, not a stacked copy (joint training's data is GBs); device_put
        # copies once, where jnp.asarray holds a second transient copy on CPU.
        dx, dy, dm, dt = (
            jax.device_put(np.stack(col) if len(col) > 1 else col[0][None])
            for col in zip(*arrays, strict=True)
        )
        for lo in range(0, cfg.steps_per_task, cfg.chunk_steps):
            sl = jnp.asarray(idx[:, lo : lo + cfg.chunk_steps])
            steps = jnp.broadcast_to(
                jnp.arange(lo, lo + sl.shape[1], dtype=jnp.int32), sl.shape[:2]
            )
            params, opt_state, losses = chunk_fn(
                params, opt_state, extra, dx, dy, dm, dt, sl, steps
            )
            progress.update(int(sl.shape[1]), task=t, loss=f"{float(losses[:, -1].mean()):.3f}")
        del dx, dy, dm, dt
        new_opt, new_extra = [], []
        for i, ln in enumerate(lanes):
            p_i, o_i, e_i = _unstack(params, i), _unstack(opt_state, i), _unstack(extra, i)
            if method.after_task is not None:
                ctx = TaskContext(
                    task=t,
                    x_train=arrays[i][0],
                    y_train=arrays[i][1],
                    class_mask=ln.masks[t],
                    logits_fn=net.logits,
                    inputs_fn=net.inputs,
                    curvature_logits_fn=net.reduced_logits,
                    rng=np.random.default_rng([ln.seed, t, 2]),
                    config=cfg,
                )
                o_i, e_i = method.after_task(ctx, p_i, o_i, e_i)
                del ctx
            new_opt.append(o_i)
            new_extra.append(e_i)
            if method.fresh_network_per_task:
                ln.per_task.append(p_i)
            for j in range(min(t + 2, T)):
                pj = ln.per_task[j] if (method.fresh_network_per_task and j <= t) else p_i
                ln.R[t, j] = _evaluate(
                    correct, pj, *ln.test_split(j), ln.masks[j], j, cfg.eval_batch_size
                )
            if cfg.checkpoint:
                save_checkpoint(
                    ln.ckpt_root / f"task_{t:03d}",
                    {"params": p_i, "opt_state": o_i, "extra": e_i, "per_task": ln.per_task},
                    {
                        "task": t,
                        "seed": ln.seed,
                        "method": method.name,
                        "R": ln.R.tolist(),
                        "per_task": len(ln.per_task),
                        "fingerprint": cfg.fingerprint(),
                        "rng": {
                            "kind": "numpy default_rng keyed by [seed, task, stream]",
                            "seed": ln.seed,
                        },
                    },
                )
        # Drop this task's training data before the next task's is built (joint training:
        # otherwise both tasks' GBs are held at once).
        del arrays
        opt_state, extra = _stack(new_opt), _stack(new_extra)
        yield t, lanes, random_init
    progress.close()


def run(
    cfg: Config, workdir: str | Path, *, log=print, progress: bool | None = None
) -> dict[str, Any]:
    """Runs every method and seed of ``cfg``; writes and returns the results.

    Results are rewritten after every task, so a partial run has a valid ``summary.md``;
    rerunning the same command on the same ``workdir`` resumes from the checkpoints.
    ``progress``: draw a progress bar on stderr (``None``: only if stderr is a terminal).

    Returns:
      ``{"summaries": {method: summary}, "matrices": {method: [R per seed]}}``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    matrices: dict[str, list] = {m: [] for m in cfg.methods}
    random_init: dict[str, list] = {m: [] for m in cfg.methods}
    config = {
        **cfg.to_dict(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "scenario": _report.SCENARIO,
    }
    summaries: dict = {}
    for name in cfg.methods:
        method = METHODS[name]
        for seeds in _seed_groups(cfg, method):
            t0 = time.time()
            slots = []
            for _ in seeds:
                slots.append(len(matrices[name]))
                matrices[name].append(None)
                random_init[name].append(None)
            lanes: list[_Lane] = []
            for t, lanes, b in _run_group(cfg, method, seeds, workdir, log, progress):
                for slot, ln, b_i in zip(slots, lanes, b, strict=True):
                    matrices[name][slot] = ln.R[: t + 1, : t + 1].copy()
                    random_init[name][slot] = b_i
                summaries = _report.write_run_report(
                    workdir,
                    config=config,
                    matrices={k: v for k, v in matrices.items() if v and v[0] is not None},
                    random_init={
                        k: np.stack(v) for k, v in random_init.items() if v and v[0] is not None
                    },
                    plots=cfg.plots and t == lanes[0].T - 1,
                )
            for slot, seed in zip(slots, seeds, strict=True):
                log(f"\n[{name} seed {seed}] accuracy matrix ({time.time() - t0:.1f} s)")
                log(_report.format_matrix(matrices[name][slot]))
    log("\n" + _report.summary_table(summaries))
    return {"summaries": summaries, "matrices": matrices}
