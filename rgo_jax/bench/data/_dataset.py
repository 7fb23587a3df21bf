"""The in-memory ``Dataset`` record shared by every loader, and its seeded splits."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

__all__ = ["Dataset", "stratified_split"]


def _check_images(name: str, field: str, x: np.ndarray) -> None:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"Dataset {name!r}: {field} must be a numpy array, got {type(x).__name__}.")
    if x.dtype != np.float32:
        raise TypeError(f"Dataset {name!r}: {field} must be float32, got {x.dtype}.")
    if x.ndim < 2:
        raise ValueError(
            f"Dataset {name!r}: {field} must be [N, ...] (images [N, H, W, C]), "
            f"got shape {x.shape}."
        )


def _check_labels(name: str, field: str, y: np.ndarray, n: int, num_classes: int) -> None:
    if not isinstance(y, np.ndarray):
        raise TypeError(f"Dataset {name!r}: {field} must be a numpy array, got {type(y).__name__}.")
    if y.dtype != np.int32:
        raise TypeError(f"Dataset {name!r}: {field} must be int32, got {y.dtype}.")
    if y.shape != (n,):
        raise ValueError(
            f"Dataset {name!r}: {field} must have shape ({n},) to match the images, got {y.shape}."
        )
    if n and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"Dataset {name!r}: {field} has labels in [{y.min()}, {y.max()}], "
            f"outside [0, {num_classes - 1}] for num_classes={num_classes}."
        )


def stratified_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded, stratified split of sample indices into ``(rest, held_out)``.

    Each class contributes ``round(fraction * n_c)`` of its ``n_c`` samples to the held-out
    part (at least one when ``n_c >= 2``, never all of them), chosen by a generator seeded
    with ``seed``. Both index arrays are sorted, so the original sample order is kept.

    Args:
      labels: integer labels ``[N]``.
      fraction: the held-out share, strictly between 0 and 1.
      seed: non-negative integer seed.

    Returns:
      ``(rest, held_out)``: two sorted ``int64`` index arrays partitioning ``range(N)``.

    Examples:
      >>> import numpy as np
      >>> rest, held = stratified_split(np.array([0, 0, 0, 0, 1, 1, 1, 1]), 0.25, seed=0)
      >>> len(rest), len(held), sorted(np.array([0, 0, 0, 0, 1, 1, 1, 1])[held].tolist())
      (6, 2, [0, 1])
    """
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"split fraction must be strictly between 0 and 1, got {fraction}.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0x5EED]))
    held = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            k = min(max(k, 1), len(idx) - 1)
        else:
            k = 0
        held.append(rng.permutation(idx)[:k])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, np.int64)
    mask = np.ones(len(labels), bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A labelled train/test data set held in memory as numpy arrays.

    Images are ``float32`` in ``[0, 1]`` with layout NHWC ``[N, H, W, C]`` (MNIST gives
    ``[N, 28, 28, 1]``); labels are ``int32`` class ids in ``[0, num_classes)``. Generic
    data from :func:`load_npz` may instead be feature vectors ``[N, D]``. Validated on
    construction: wrong dtypes, mismatched counts or out-of-range labels raise.

    Attributes:
      name: a short name (``"mnist"``, ``"cifar100"``, ...).
      x_train: training inputs ``[N_train, ...]``, float32.
      y_train: training labels ``[N_train]``, int32.
      x_test: test inputs ``[N_test, ...]`` with the same per-sample shape, float32.
      y_test: test labels ``[N_test]``, int32.
      num_classes: number of classes (the size of a classifier head for this data).
      class_names: optional human-readable names, one per class.

    Examples:
      >>> import numpy as np
      >>> ds = Dataset("toy", np.zeros((4, 2, 2, 1), np.float32), np.array([0, 1, 0, 1], np.int32),
      ...              np.zeros((2, 2, 2, 1), np.float32), np.array([0, 1], np.int32), 2)
      >>> ds
      Dataset('toy', train=4, test=2, input_shape=(2, 2, 1), num_classes=2)
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        name = self.name
        if not isinstance(self.num_classes, (int, np.integer)) or self.num_classes < 1:
            raise ValueError(
                f"Dataset {name!r}: num_classes must be a positive int, got {self.num_classes!r}."
            )
        object.__setattr__(self, "num_classes", int(self.num_classes))
        _check_images(name, "x_train", self.x_train)
        _check_images(name, "x_test", self.x_test)
        for field in ("x_train", "x_test"):
            if len(getattr(self, field)) == 0:
                raise ValueError(
                    f"Dataset {name!r}: {field} holds no samples; a data set needs training "
                    "and test samples."
                )
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise ValueError(
                f"Dataset {name!r}: train samples have shape {self.x_train.shape[1:]} but test "
                f"samples have shape {self.x_test.shape[1:]}."
            )
        _check_labels(name, "y_train", self.y_train, len(self.x_train), self.num_classes)
        _check_labels(name, "y_test", self.y_test, len(self.x_test), self.num_classes)
        if self.class_names is not None:
            names = tuple(str(c) for c in self.class_names)
            if len(names) != self.num_classes:
                raise ValueError(
                    f"Dataset {name!r}: {len(names)} class names for "
                    f"num_classes={self.num_classes}."
                )
            object.__setattr__(self, "class_names", names)

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(28, 28, 1)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    def split_validation(self, fraction: float = 0.1, seed: int = 0) -> Dataset:
        """A validation view: train minus a held-out part, and that held-out part as test.

        The held-out part is drawn from the TRAINING set only (stratified by class, seeded,
        deterministic), so hyperparameters can be tuned without touching the test set. The
        returned data set's ``x_test``/``y_test`` are that held-out part; the real test set
        is not included.

        Args:
          fraction: share of each class moved to the held-out part, in ``(0, 1)``.
          seed: seed of the split.

        Returns:
          A new ``Dataset`` named ``"<name>-val"``.

        Examples:
          >>> import numpy as np
          >>> y = np.repeat(np.arange(2, dtype=np.int32), 10)
          >>> ds = Dataset("toy", np.zeros((20, 3), np.float32), y,
          ...              np.zeros((4, 3), np.float32), y[:4], 2)
          >>> val = ds.split_validation(0.2, seed=0)
          >>> len(val.x_train), len(val.x_test), np.bincount(val.y_test).tolist()
          (16, 4, [2, 2])
        """
        rest, held = stratified_split(self.y_train, fraction, seed)
        return Dataset(
            name=f"{self.name}-val",
            x_train=self.x_train[rest],
            y_train=self.y_train[rest],
            x_test=self.x_train[held],
            y_test=self.y_train[held],
            num_classes=self.num_classes,
            class_names=self.class_names,
        )


def as_class_names(names: Sequence[object] | None) -> tuple[str, ...] | None:
    """Decodes a list of (possibly ``bytes``) class names to a tuple of ``str``."""
    if names is None:
        return None
    out = []
    for n in names:
        if isinstance(n, bytes):
            n = n.decode("utf-8", errors="replace")
        out.append(str(n))
    return tuple(out)
