"""Continual-learning task streams: permuted, rotated, class-split and multi-dataset.

A :class:`TaskStream` is a sequence of :class:`Task` objects built lazily, one at a time,
from a base :class:`~rgo_jax.bench.data.Dataset`: twenty permuted copies of MNIST are never all
in memory. Every random choice (pixel permutation, rotation angle, class order,
subsample) is a pure function of ``(seed, task id)`` via ``numpy.random.SeedSequence``, so
``stream[t]`` is the same array data on every call and every machine.

Labels of every task are GLOBAL class ids into one shared output head of size
``stream.num_classes``; ``stream.class_mask(t)`` marks the classes of task ``t`` (the
task-incremental "masked single head" setting).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from rgo_jax.bench.data._dataset import Dataset
from rgo_jax.bench.data._image import resize_images, rotate_images

__all__ = [
    "SUBSAMPLES",
    "Task",
    "TaskStream",
    "check_subsample",
    "class_split",
    "multi_dataset",
    "permuted",
    "pixel_permutation",
    "rotated",
]

# Domain-separation tags for the seed sequences (never change: they fix the streams).
_TAG_PERMUTATION = 1
_TAG_ANGLE = 2
_TAG_TRAIN_SUBSAMPLE = 3
_TAG_TEST_SUBSAMPLE = 4
_TAG_CLASS_ORDER = 5

Split = tuple[np.ndarray, np.ndarray]


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def _check_seed(seed: int) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def _check_num_tasks(num_tasks: int) -> int:
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive integer, got {num_tasks!r}.")
    return int(num_tasks)


SUBSAMPLES = ("random", "first")
"""How ``max_train_per_task`` / ``max_test_per_task`` choose their samples: ``"random"``, a
seeded random subset per task (the default), or ``"first"``, the first samples of the
split (of the task's classes), the same for every task: GPM's code, which keeps the first
54,000 MNIST training images for all its permuted tasks."""


def check_subsample(value: str) -> str:
    """``value`` if it is one of :data:`SUBSAMPLES`, else ``ValueError`` naming them."""
    if value not in SUBSAMPLES:
        raise ValueError(f"subsample must be one of {', '.join(SUBSAMPLES)}, got {value!r}.")
    return value


def _check_max(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer or None, got {value!r}.")
    return int(value)


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Task:
    """One task of a continual-learning stream.

    Attributes:
      task_id: position of the task in its stream (0-based).
      classes: sorted ``int32`` global class ids of this task.
      x_train: training inputs, e.g. ``[N, H, W, C]`` float32.
      y_train: training labels ``[N]`` int32, GLOBAL class ids (into the shared head).
      x_test: test inputs.
      y_test: test labels ``[N_test]`` int32, global class ids.
      name: a readable name, e.g. ``"permuted-3"``.
    """

    task_id: int
    classes: np.ndarray
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    name: str = ""

    def __repr__(self) -> str:
        return (
            f"Task({self.task_id}, {self.name!r}, classes={self.classes.tolist()}, "
            f"train={len(self.x_train)}, test={len(self.x_test)}, "
            f"input_shape={self.input_shape})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input sample."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def class_mask(self, num_classes: int) -> np.ndarray:
        """Boolean ``[num_classes]`` mask of this task's classes."""
        mask = np.zeros(num_classes, bool)
        mask[self.classes] = True
        return mask


class TaskStream:
    """A lazily built sequence of tasks sharing one classifier head.

    ``stream[t]`` builds task ``t`` on demand (only the most recent ``cache_size`` tasks
    are kept); ``stream.get_split(t, "test")`` builds only one split, which is the cheap
    way to evaluate earlier tasks. Iterating yields tasks ``0 .. num_tasks-1`` in order.

    Usually made by :func:`permuted`, :func:`rotated`, :func:`class_split` or
    :func:`multi_dataset`; :meth:`from_tasks` wraps tasks already in memory.

    Attributes:
      name: the stream's name, e.g. ``"permuted-mnist"``.
      num_tasks: number of tasks.
      num_classes: size of the shared output head.
      input_shape: shape of one input sample.
      seed: the seed the stream was built from.
      meta: builder-specific details (``"angles"``, ``"class_order"``, ``"offsets"``...).

    Examples:
      >>> import numpy as np
      >>> from rgo_jax.bench.data import Dataset, class_split
      >>> y = np.arange(8, dtype=np.int32) % 4
      >>> ds = Dataset("toy", np.zeros((8, 2, 2, 1), np.float32), y,
      ...              np.zeros((8, 2, 2, 1), np.float32), y, 4)
      >>> stream = class_split(ds, num_tasks=2, seed=0, shuffle_classes=False)
      >>> len(stream), stream.num_classes, stream[1].classes.tolist()
      (2, 4, [2, 3])
      >>> stream.class_mask(1).tolist()
      [False, False, True, True]
    """

    def __init__(
        self,
        *,
        name: str,
        num_classes: int,
        input_shape: Sequence[int],
        task_classes: Sequence[np.ndarray],
        build_split: Callable[[int, str], Split],
        task_names: Sequence[str] | None = None,
        seed: int = 0,
        meta: dict[str, Any] | None = None,
        cache_size: int = 1,
    ) -> None:
        self.name = name
        self.num_classes = int(num_classes)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.seed = seed
        self.meta = dict(meta or {})
        self._classes = [np.sort(np.asarray(c, np.int32)) for c in task_classes]
        for t, c in enumerate(self._classes):
            if c.ndim != 1 or len(c) == 0:
                raise ValueError(f"task {t} of {name!r} has no classes.")
            if c.min() < 0 or c.max() >= self.num_classes:
                raise ValueError(
                    f"task {t} of {name!r} has classes {c.tolist()} outside the head of "
                    f"size {self.num_classes}."
                )
        self._build_split = build_split
        self._names = (
            list(task_names)
            if task_names is not None
            else [f"{name}-{t}" for t in range(len(self))]
        )
        if len(self._names) != len(self._classes):
            raise ValueError(f"{len(self._names)} task names for {len(self._classes)} tasks.")
        self._cache_size = max(0, int(cache_size))
        self._cache: collections.OrderedDict[int, Task] = collections.OrderedDict()

    @classmethod
    def from_tasks(cls, tasks: Sequence[Task], num_classes: int, name: str = "tasks") -> TaskStream:
        """Wraps tasks that are already in memory (all kept) as a stream."""
        tasks = list(tasks)
        if not tasks:
            raise ValueError("from_tasks needs at least one task.")

        def build(t: int, split: str) -> Split:
            task = tasks[t]
            return (task.x_train, task.y_train) if split == "train" else (task.x_test, task.y_test)

        return cls(
            name=name,
            num_classes=num_classes,
            input_shape=tasks[0].input_shape,
            task_classes=[t.classes for t in tasks],
            build_split=build,
            task_names=[t.name or f"{name}-{i}" for i, t in enumerate(tasks)],
            cache_size=0,
        )

    @property
    def num_tasks(self) -> int:
        """Number of tasks."""
        return len(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __repr__(self) -> str:
        return (
            f"TaskStream({self.name!r}, num_tasks={self.num_tasks}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape}, seed={self.seed})"
        )

    def _index(self, t: int) -> int:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)):
            raise TypeError(f"task index must be an integer, got {type(t).__name__}.")
        n = len(self)
        t = int(t)
        if t < -n or t >= n:
            raise IndexError(f"task {t} out of range for a stream of {n} tasks.")
        return t % n

    def task_classes(self, t: int) -> np.ndarray:
        """Sorted global class ids of task ``t`` (no data is built)."""
        return self._classes[self._index(t)].copy()

    def class_mask(self, t: int) -> np.ndarray:
        """Boolean ``[num_classes]`` mask, True at the classes of task ``t``."""
        mask = np.zeros(self.num_classes, bool)
        mask[self._classes[self._index(t)]] = True
        return mask

    def class_masks(self) -> np.ndarray:
        """Boolean ``[num_tasks, num_classes]``: row ``t`` is :meth:`class_mask` ``(t)``."""
        return np.stack([self.class_mask(t) for t in range(len(self))])

    def get_split(self, t: int, split: str) -> Split:
        """Builds only the ``"train"`` or ``"test"`` inputs and labels of task ``t``."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
        t = self._index(t)
        if t in self._cache:
            task = self._cache[t]
            return (task.x_train, task.y_train) if split == "train" else (task.x_test, task.y_test)
        return self._build_split(t, split)

    def __getitem__(self, t: int) -> Task:
        t = self._index(t)
        if t in self._cache:
            self._cache.move_to_end(t)
            return self._cache[t]
        x_train, y_train = self._build_split(t, "train")
        x_test, y_test = self._build_split(t, "test")
        task = Task(t, self._classes[t].copy(), x_train, y_train, x_test, y_test, self._names[t])
        if self._cache_size:
            self._cache[t] = task
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return task

    def __iter__(self) -> Iterator[Task]:
        for t in range(len(self)):
            yield self[t]


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------


def _subsample(
    n: int, max_n: int | None, seed: int, t: int, tag: int, how: str = "random"
) -> np.ndarray | None:
    """Sorted indices of a subsample of ``range(n)`` (:data:`SUBSAMPLES`), or None to keep all."""
    if max_n is None or max_n >= n:
        return None
    if how == "first":
        return np.arange(max_n)
    return np.sort(_rng(seed, t, tag).choice(n, size=max_n, replace=False))


def _pick(
    dataset: Dataset,
    split: str,
    t: int,
    seed: int,
    max_train: int | None,
    max_test: int | None,
    index: np.ndarray | None = None,
    how: str = "random",
) -> Split:
    """The (optionally class-filtered, optionally subsampled) split of a data set."""
    x, y = (
        (dataset.x_train, dataset.y_train) if split == "train" else (dataset.x_test, dataset.y_test)
    )
    max_n, tag = (
        (max_train, _TAG_TRAIN_SUBSAMPLE) if split == "train" else (max_test, _TAG_TEST_SUBSAMPLE)
    )
    n = len(y) if index is None else len(index)
    sub = _subsample(n, max_n, seed, t, tag, how)
    if index is None:
        index = sub
    elif sub is not None:
        index = index[sub]
    if index is None:
        return x, y
    return x[index], y[index]


def _require_images(dataset: Dataset, builder: str) -> None:
    if dataset.x_train.ndim != 4:
        raise ValueError(
            f"{builder}: needs images [N, H, W, C]; {dataset.name!r} has samples of shape "
            f"{dataset.input_shape}."
        )


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def pixel_permutation(
    seed: int, task: int, size: int, *, first_task_identity: bool = True
) -> np.ndarray:
    """The fixed pixel permutation of task ``task`` in a permuted stream.

    A pure function of ``(seed, task)``: ``numpy.random.default_rng(SeedSequence([seed,
    task, 1])).permutation(size)``; task 0 is the identity when ``first_task_identity``.

    Examples:
      >>> pixel_permutation(0, 0, 5).tolist()
      [0, 1, 2, 3, 4]
      >>> sorted(pixel_permutation(0, 3, 5).tolist())
      [0, 1, 2, 3, 4]
    """
    if task == 0 and first_task_identity:
        return np.arange(size, dtype=np.int64)
    return _rng(seed, task, _TAG_PERMUTATION).permutation(size)


def permuted(
    dataset: Dataset,
    num_tasks: int,
    seed: int = 0,
    *,
    first_task_identity: bool = True,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    subsample: str = "random",
    cache_size: int = 1,
) -> TaskStream:
    """Permuted-input stream: task ``t`` applies one fixed permutation to all input values.

    The permutation acts on the flattened ``H*W*C`` values of each sample (then reshaped
    back), ``x_t.reshape(N, -1) == x.reshape(N, -1)[:, pixel_permutation(seed, t, D)]``.
    Every task has all the data set's classes (domain-incremental over one shared head).
    Task 0 is the unpermuted data set by default, as in the RGO reference code.

    Args:
      dataset: the base data set (e.g. MNIST).
      num_tasks: number of tasks (20 in the paper).
      seed: seed of the permutations and subsamples.
      first_task_identity: leave task 0 unpermuted.
      max_train_per_task: keep this many training samples (a seeded random subset).
      max_test_per_task: same for the test samples.
      subsample: ``"random"`` or ``"first"`` samples for those (:data:`SUBSAMPLES`).
      cache_size: number of built tasks kept in memory.

    Returns:
      A ``TaskStream`` named ``"permuted-<dataset>"``.

    Examples:
      >>> from rgo_jax.bench.data import load_digits, permuted
      >>> stream = permuted(load_digits(), num_tasks=3, seed=0)
      >>> task = stream[2]
      >>> task.x_train.shape[1:], task.classes.tolist() == list(range(10))
      ((8, 8, 1), True)
    """
    num_tasks = _check_num_tasks(num_tasks)
    seed = _check_seed(seed)
    max_train = _check_max("max_train_per_task", max_train_per_task)
    max_test = _check_max("max_test_per_task", max_test_per_task)
    how = check_subsample(subsample)
    size = int(np.prod(dataset.input_shape))

    def build(t: int, split: str) -> Split:
        x, y = _pick(dataset, split, t, seed, max_train, max_test, how=how)
        if t == 0 and first_task_identity:  # the data as they are: no 0.2 s copy per split
            view = x.view()
            view.flags.writeable = False  # shared with the data set: never written in place
            return view, y
        perm = pixel_permutation(seed, t, size, first_task_identity=first_task_identity)
        flat = x.reshape(len(x), size)
        return np.take(flat, perm, axis=1).reshape(x.shape), y

    all_classes = np.arange(dataset.num_classes)
    return TaskStream(
        name=f"permuted-{dataset.name}",
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        task_classes=[all_classes] * num_tasks,
        build_split=build,
        seed=seed,
        meta={"first_task_identity": first_task_identity},
        cache_size=cache_size,
    )


def rotated(
    dataset: Dataset,
    num_tasks: int,
    seed: int = 0,
    *,
    angle_step: float = 9.0,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    subsample: str = "random",
    cache_size: int = 1,
) -> TaskStream:
    """Rotated-input stream: task ``t`` rotates every image by one angle in degrees.

    The angle of task ``t`` is drawn uniformly from ``[angle_step * t, angle_step * (t+1))``
    by a generator seeded with ``(seed, t)`` — with 20 tasks and a 9 degree step this is the
    paper's rotated MNIST, covering 0..180 degrees. Rotation is about the image centre,
    bilinear, zero fill (:func:`rotate_images`, the convention of
    ``scipy.ndimage.rotate(..., reshape=False, order=1)`` used by the reference code). The
    angles are in ``stream.meta["angles"]``.

    Args:
      dataset: base data set with images ``[N, H, W, C]``.
      num_tasks: number of tasks.
      seed: seed of the angles and subsamples.
      angle_step: width of each task's angle interval, degrees.
      max_train_per_task: keep this many training samples (a seeded random subset).
      max_test_per_task: same for the test samples.
      subsample: ``"random"`` or ``"first"`` samples for those (:data:`SUBSAMPLES`).
      cache_size: number of built tasks kept in memory.

    Returns:
      A ``TaskStream`` named ``"rotated-<dataset>"``.
    """
    num_tasks = _check_num_tasks(num_tasks)
    seed = _check_seed(seed)
    _require_images(dataset, "rotated")
    max_train = _check_max("max_train_per_task", max_train_per_task)
    max_test = _check_max("max_test_per_task", max_test_per_task)
    how = check_subsample(subsample)
    step = float(angle_step)
    angles = np.array(
        [_rng(seed, t, _TAG_ANGLE).uniform(step * t, step * t + step) for t in range(num_tasks)]
    )

    def build(t: int, split: str) -> Split:
        x, y = _pick(dataset, split, t, seed, max_train, max_test, how=how)
        return rotate_images(x, float(angles[t])).astype(np.float32, copy=False), y

    all_classes = np.arange(dataset.num_classes)
    return TaskStream(
        name=f"rotated-{dataset.name}",
        num_classes=dataset.num_classes,
        input_shape=dataset.input_shape,
        task_classes=[all_classes] * num_tasks,
        build_split=build,
        task_names=[f"rotated-{dataset.name}-{t} ({angles[t]:.2f} deg)" for t in range(num_tasks)],
        seed=seed,
        meta={"angles": angles, "angle_step": step},
        cache_size=cache_size,
    )


def class_split(
    dataset: Dataset,
    num_tasks: int,
    seed: int = 0,
    *,
    classes_per_task: int | None = None,
    shuffle_classes: bool = True,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    subsample: str = "random",
    cache_size: int = 1,
) -> TaskStream:
    """Class-split stream: task ``t`` holds ``classes_per_task`` classes of the data set.

    The class order is a seeded permutation of all classes (or ``0, 1, ...`` when
    ``shuffle_classes=False``), cut into consecutive groups: task ``t`` gets
    ``order[t*k:(t+1)*k]``. 20-split CIFAR-100 is ``class_split(cifar100, 20)`` (5 classes
    per task). Labels stay global class ids; the order is in ``stream.meta["class_order"]``,
    each task's number of training samples in ``stream.meta["train_sizes"]``.

    Args:
      dataset: the base data set.
      num_tasks: number of tasks.
      seed: seed of the class order and subsamples.
      classes_per_task: classes per task; default ``num_classes // num_tasks``.
      shuffle_classes: draw the class order from the seed.
      max_train_per_task: keep this many training samples (a seeded random subset).
      max_test_per_task: same for the test samples.
      subsample: ``"random"`` or ``"first"`` samples for those (:data:`SUBSAMPLES`).
      cache_size: number of built tasks kept in memory.

    Returns:
      A ``TaskStream`` named ``"split-<dataset>"``.

    Raises:
      ValueError: if ``num_tasks * classes_per_task`` exceeds the number of classes.
    """
    num_tasks = _check_num_tasks(num_tasks)
    seed = _check_seed(seed)
    max_train = _check_max("max_train_per_task", max_train_per_task)
    max_test = _check_max("max_test_per_task", max_test_per_task)
    how = check_subsample(subsample)
    nc = dataset.num_classes
    k = nc // num_tasks if classes_per_task is None else int(classes_per_task)
    if k < 1 or num_tasks * k > nc:
        raise ValueError(
            f"class_split: cannot make {num_tasks} tasks of {k} classes from the {nc} classes "
            f"of {dataset.name!r} (needs num_tasks * classes_per_task <= {nc}, "
            "classes_per_task >= 1)."
        )
    order = _rng(seed, _TAG_CLASS_ORDER).permutation(nc) if shuffle_classes else np.arange(nc)
    groups = [np.sort(order[t * k : (t + 1) * k]) for t in range(num_tasks)]
    counts = np.bincount(dataset.y_train, minlength=nc)
    train_sizes = [int(counts[g].sum()) for g in groups]
    if max_train is not None:
        train_sizes = [min(n, max_train) for n in train_sizes]

    def build(t: int, split: str) -> Split:
        y_all = dataset.y_train if split == "train" else dataset.y_test
        index = np.flatnonzero(np.isin(y_all, groups[t]))
        if len(index) == 0:  # evaluating it would divide by zero
            raise ValueError(
                f"class_split of {dataset.name!r}: task {t} has no {split} samples (its "
                f"classes {groups[t].tolist()} are absent from the {split} set)."
            )
        return _pick(dataset, split, t, seed, max_train, max_test, index, how)

    return TaskStream(
        name=f"split-{dataset.name}",
        num_classes=nc,
        input_shape=dataset.input_shape,
        task_classes=groups,
        build_split=build,
        seed=seed,
        meta={"class_order": order, "classes_per_task": k, "train_sizes": train_sizes},
        cache_size=cache_size,
    )


_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def _to_shape(x: np.ndarray, image_shape: tuple[int, int, int], name: str) -> np.ndarray:
    h, w, c = image_shape
    if x.shape[1:3] != (h, w):
        x = resize_images(x, (h, w))
    src_c = x.shape[-1]
    if src_c == c:
        return x.astype(np.float32, copy=False)
    if src_c == 1:
        return np.repeat(x, c, axis=-1).astype(np.float32, copy=False)
    if src_c == 3 and c == 1:
        return np.einsum("nhwc,c->nhw", x, _LUMA)[..., None].astype(np.float32)
    raise ValueError(f"multi_dataset: cannot map {src_c} channels of {name!r} to {c} channels.")


def multi_dataset(
    datasets: Sequence[Dataset],
    *,
    image_shape: Sequence[int] = (32, 32, 3),
    seed: int = 0,
    max_train_per_task: int | None = None,
    max_test_per_task: int | None = None,
    subsample: str = "random",
    cache_size: int = 1,
) -> TaskStream:
    """One task per data set, all brought to one image shape, each with its own head slice.

    Task ``k`` is ``datasets[k]`` resized (bilinear, antialiased when shrinking) to
    ``image_shape`` with grey images repeated to 3 channels (colour to grey uses ITU-R 601
    luma weights); its labels are offset by the total class count of the earlier data
    sets, so the head has ``sum(num_classes)`` outputs. With MNIST, CIFAR-10, SVHN,
    notMNIST and Fashion-MNIST this is the "5-datasets" benchmark. Offsets are in
    ``stream.meta["offsets"]``.

    Args:
      datasets: the data sets, in task order (images ``[N, H, W, C]``).
      image_shape: common ``(H, W, C)``.
      seed: seed of the subsamples.
      max_train_per_task: keep this many training samples (a seeded random subset).
      max_test_per_task: same for the test samples.
      subsample: ``"random"`` or ``"first"`` samples for those (:data:`SUBSAMPLES`).
      cache_size: number of built tasks kept in memory.

    Returns:
      A ``TaskStream`` named ``"multi-<name1>+<name2>..."``.
    """
    datasets = list(datasets)
    if not datasets:
        raise ValueError("multi_dataset needs at least one data set.")
    seed = _check_seed(seed)
    shape = tuple(int(d) for d in image_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"multi_dataset: image_shape must be (H, W, C), got {image_shape}.")
    for ds in datasets:
        _require_images(ds, "multi_dataset")
    max_train = _check_max("max_train_per_task", max_train_per_task)
    max_test = _check_max("max_test_per_task", max_test_per_task)
    how = check_subsample(subsample)
    offsets = np.cumsum([0] + [ds.num_classes for ds in datasets])

    def build(t: int, split: str) -> Split:
        ds = datasets[t]
        x, y = _pick(ds, split, t, seed, max_train, max_test, how=how)
        return _to_shape(x, shape, ds.name), (y + offsets[t]).astype(np.int32)

    return TaskStream(
        name="multi-" + "+".join(ds.name for ds in datasets),
        num_classes=int(offsets[-1]),
        input_shape=shape,
        task_classes=[np.arange(offsets[t], offsets[t + 1]) for t in range(len(datasets))],
        build_split=build,
        task_names=[ds.name for ds in datasets],
        seed=seed,
        meta={"offsets": offsets[:-1].copy()},
        cache_size=cache_size,
    )
