"""Loaders for standard on-disk data set formats (IDX, CIFAR pickles, miniImageNet, npz).

Every loader returns a :class:`Dataset` with ``float32`` images in ``[0, 1]``, layout NHWC,
and ``int32`` labels. Nothing here touches the network: missing files raise an error that
names the paths tried and how to fix it (see :func:`rgo_jax.bench.data.download`).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rgo_jax.bench.data._dataset import Dataset, as_class_names, stratified_split
from rgo_jax.bench.data._idx import read_idx
from rgo_jax.bench.data._pickle import load_pickle, normalize_keys

__all__ = [
    "DATASET_NAMES",
    "default_data_dir",
    "load_cifar10",
    "load_cifar100",
    "load_dataset",
    "load_digits",
    "load_fashion_mnist",
    "load_miniimagenet",
    "load_mnist",
    "load_notmnist",
    "load_npz",
]

DATA_DIR_ENV = "RGO_DATA_DIR"
DATASET_NAMES = (
    "mnist",
    "fashion_mnist",
    "notmnist",
    "cifar10",
    "cifar100",
    "miniimagenet",
    "digits",
)
_DOWNLOADABLE = ("mnist", "fashion_mnist", "cifar10", "cifar100")

MNIST_CLASSES = tuple(str(i) for i in range(10))
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NOTMNIST_CLASSES = tuple("ABCDEFGHIJ")


def default_data_dir() -> Path:
    """The data folder used when none is given: ``$RGO_DATA_DIR``, else ``~/.cache/rgo_jax``."""
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        return Path(env).expanduser()
    return Path("~/.cache/rgo_jax").expanduser()


_HOW_TO_GET = {
    "cifar10": (
        "The official CIFAR-10 python release (cifar-10-python.tar.gz) unpacks to "
        "cifar-10-batches-py/ (data_batch_1 .. data_batch_5, test_batch, batches.meta): "
        "extract it into a folder and pass that folder"
    ),
}


def _fix_hint(dataset: str, root: Path) -> str:
    hint = f"Pass the folder that holds it (--data-dir / data_dir=), or set ${DATA_DIR_ENV}."
    if dataset in _HOW_TO_GET:
        hint += f" {_HOW_TO_GET[dataset]}."
    if dataset in _DOWNLOADABLE:
        hint += (
            f" Or download it (network needed) into a writable folder with "
            f"rgo_jax.bench.data.download({dataset!r}, FOLDER)."
        )
    return hint


def _not_found(dataset: str, root: Path, tried: Sequence[Path], expected: str) -> FileNotFoundError:
    tried_s = ", ".join(str(p) for p in tried)
    return FileNotFoundError(
        f"{dataset}: data not found. Expected {expected}; tried: {tried_s}. "
        + _fix_hint(dataset, root)
    )


def _check_root(dataset: str, root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"{dataset}: data folder {root} does not exist. " + _fix_hint(dataset, root)
        )
    return root


def _to_unit_float(x: np.ndarray, what: str) -> np.ndarray:
    """uint8 pixels -> float32 in [0, 1] (exactly x / 255)."""
    if x.dtype != np.uint8:
        raise ValueError(f"{what}: expected uint8 pixels, got {x.dtype}.")
    out = x.astype(np.float32)
    out /= np.float32(255.0)
    return out


def _as_labels(y: np.ndarray, what: str, num_classes: int | None = None) -> np.ndarray:
    """Integer class ids -> int32, refusing values that int32 (or ``num_classes``) cannot
    hold instead of letting them wrap around (``2**32 + 3`` is not class 3)."""
    y = np.asarray(y)
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers, got {y.dtype}.")
    hi = np.iinfo(np.int32).max if num_classes is None else num_classes - 1
    if y.size and (y.min() < 0 or y.max() > hi):
        raise ValueError(
            f"{what}: labels range over [{y.min()}, {y.max()}], outside [0, {hi}]"
            + ("" if num_classes is None else f" for {num_classes} classes")
            + "."
        )
    return y.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# IDX (MNIST, Fashion-MNIST, notMNIST)
# ----------------------------------------------------------------------------------------------


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The first existing variant of an IDX file name in ``folder``."""
    dotted = stem.replace("-idx", ".idx")  # e.g. train-images.idx3-ubyte
    for name in (stem, stem + ".gz", dotted, dotted + ".gz"):
        p = folder / name
        if p.is_file():
            return p
    return None


def _load_idx_pair(folder: Path, prefix: str, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    img_path = _idx_file(folder, f"{prefix}-images-idx3-ubyte")
    lab_path = _idx_file(folder, f"{prefix}-labels-idx1-ubyte")
    for p, stem in ((img_path, "images-idx3"), (lab_path, "labels-idx1")):
        if p is None:
            raise FileNotFoundError(
                f"{dataset}: {folder} has no {prefix}-{stem}-ubyte[.gz] file. "
                + _fix_hint(dataset, folder)
            )
    assert img_path is not None and lab_path is not None
    images = read_idx(img_path)
    labels = read_idx(lab_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"{img_path}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}."
        )
    if labels.ndim != 1:
        raise ValueError(f"{lab_path}: expected labels [N], got shape {labels.shape}.")
    if len(images) != len(labels):
        raise ValueError(
            f"{dataset}: {img_path.name} holds {len(images)} images but {lab_path.name} "
            f"holds {len(labels)} labels."
        )
    return _to_unit_float(images, str(img_path))[..., None], _as_labels(labels, str(lab_path))


def _load_idx_dataset(
    root: str | Path, dataset: str, subdirs: Sequence[str], class_names: tuple[str, ...]
) -> Dataset:
    root = _check_root(dataset, root)
    tried = [root] + [root / s for s in subdirs]
    folder = next((d for d in tried if _idx_file(d, "train-images-idx3-ubyte")), None)
    if folder is None:
        raise _not_found(
            dataset,
            root,
            tried,
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz], t10k-labels-idx1-ubyte[.gz]",
        )
    x_train, y_train = _load_idx_pair(folder, "train", dataset)
    x_test, y_test = _load_idx_pair(folder, "t10k", dataset)
    num_classes = len(class_names)
    for y, split in ((y_train, "train"), (y_test, "t10k")):
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(
                f"{dataset}: {split} labels in {folder} range over [{y.min()}, {y.max()}], "
                f"expected [0, {num_classes - 1}]."
            )
    return Dataset(dataset, x_train, y_train, x_test, y_test, num_classes, class_names)


def load_mnist(root: str | Path) -> Dataset:
    """Loads MNIST from the official IDX files (gzip-compressed or raw).

    The four files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) are
    looked up in ``root``, then in ``root/mnist``, ``root/MNIST`` and ``root/MNIST/raw``.

    Args:
      root: the folder with the files, or a folder above it.

    Returns:
      ``Dataset("mnist")``: 60,000 train and 10,000 test images ``[N, 28, 28, 1]``.

    Raises:
      FileNotFoundError: no IDX files were found (the message lists the paths tried).
      ValueError: a file is malformed or truncated, or images and labels disagree in count.
    """
    return _load_idx_dataset(root, "mnist", ("mnist", "MNIST", "MNIST/raw"), MNIST_CLASSES)


def load_fashion_mnist(root: str | Path) -> Dataset:
    """Loads Fashion-MNIST from its IDX files (same layout and file names as MNIST).

    Looked up in ``root``, ``root/fashion-mnist``, ``root/fashion_mnist``,
    ``root/FashionMNIST`` and ``root/FashionMNIST/raw``.

    Returns:
      ``Dataset("fashion_mnist")``: 60,000 + 10,000 images ``[N, 28, 28, 1]``, 10 classes.
    """
    subdirs = ("fashion-mnist", "fashion_mnist", "FashionMNIST", "FashionMNIST/raw")
    return _load_idx_dataset(root, "fashion_mnist", subdirs, FASHION_MNIST_CLASSES)


def load_notmnist(root: str | Path) -> Dataset:
    """Loads notMNIST (letters A-J) converted to the MNIST IDX layout and file names.

    Looked up in ``root``, ``root/notmnist``, ``root/notMNIST`` and ``root/notMNIST/raw``.

    Returns:
      ``Dataset("notmnist")`` with images ``[N, 28, 28, 1]`` and 10 classes (A..J).
    """
    subdirs = ("notmnist", "notMNIST", "notMNIST/raw")
    return _load_idx_dataset(root, "notmnist", subdirs, NOTMNIST_CLASSES)


# ----------------------------------------------------------------------------------------------
# CIFAR pickles
# ----------------------------------------------------------------------------------------------


def _find_folder(
    dataset: str, root: Path, candidates: Sequence[Path], marker: str, expected: str
) -> Path:
    for d in candidates:
        if (d / marker).is_file():
            return d
    raise _not_found(dataset, root, candidates, expected)


def _cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """The uint8 rows ``[N, 3072]`` and int32 labels of one CIFAR pickle."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing CIFAR batch file.")
    d = normalize_keys(load_pickle(path), path)
    for key in ("data", label_key):
        if key not in d:
            raise ValueError(f"{path}: CIFAR batch has no {key!r} entry (keys: {sorted(d)}).")
    data = np.asarray(d["data"])
    labels = np.asarray(d[label_key])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        raise ValueError(
            f"{path}: CIFAR 'data' must be uint8 [N, 3072] (3x32x32 planes), "
            f"got {data.dtype} {data.shape}."
        )
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: {len(data)} images but {label_key!r} is {labels.dtype} {labels.shape}."
        )
    return data, _as_labels(labels, f"{path} [{label_key!r}]", num_classes)


def _cifar_images(rows: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 rows ``[N, 3072]`` (R, G, B 32x32 planes) -> float32 NHWC in [0, 1], written
    into ``out`` (``[N, 32, 32, 3]`` float32) when given."""
    if out is None:
        out = np.empty((len(rows), 32, 32, 3), np.float32)
    np.copyto(out, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # one pass
    out /= np.float32(255.0)
    return out


def load_cifar10(root: str | Path) -> Dataset:
    """Loads CIFAR-10 from the official python release (``cifar-10-batches-py``).

    Reads ``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta`` from
    ``root/cifar-10-batches-py`` (or ``root`` itself, or ``root/cifar10[/cifar-10-batches-py]``).
    Each batch is a pickled dict (Python 2, so keys may be ``bytes``) with ``data`` uint8
    ``[10000, 3072]`` (the R, G and B 32x32 planes) and ``labels``. Pickles are read with a
    restricted unpickler that only rebuilds numpy arrays and plain containers.

    Returns:
      ``Dataset("cifar10")``: 50,000 + 10,000 images ``[N, 32, 32, 3]``, 10 classes.

    Raises:
      FileNotFoundError: the folder or a batch file is missing.
      rgo_jax.bench.data.UnsafePickleError: a file asks for anything but numpy arrays/containers.
    """
    dataset = "cifar10"
    root = _check_root(dataset, root)
    folder = _find_folder(
        dataset,
        root,
        [root / "cifar-10-batches-py", root, root / "cifar10" / "cifar-10-batches-py"],
        "test_batch",
        "cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}",
    )
    # Each batch goes straight into its rows of the float32 array and is dropped: the peak
    # is the images plus one batch, not plus every batch and their concatenation (~0.3 GB).
    x_train, labels, start = None, [], 0
    for i in range(1, 6):
        rows, y = _cifar_batch(folder / f"data_batch_{i}", "labels", 10)
        if x_train is None:  # the official batches hold 10,000 images each
            x_train = np.empty((5 * len(rows), 32, 32, 3), np.float32)
        if start + len(rows) > len(x_train):  # unequal batches: room for the rest
            x_train = np.concatenate([x_train[:start], np.empty_like(x_train)])
        _cifar_images(rows, x_train[start : start + len(rows)])
        labels.append(y)
        start += len(rows)
        del rows
    test_rows, y_test = _cifar_batch(folder / "test_batch", "labels", 10)
    names = None
    meta_path = folder / "batches.meta"
    if meta_path.is_file():
        meta = normalize_keys(load_pickle(meta_path), meta_path)
        names = as_class_names(meta.get("label_names"))
    return Dataset(
        dataset,
        x_train if start == len(x_train) else x_train[:start].copy(),
        np.concatenate(labels),
        _cifar_images(test_rows),
        y_test,
        10,
        names,
    )


def load_cifar100(root: str | Path, label: str = "fine") -> Dataset:
    """Loads CIFAR-100 from the official python release (``cifar-100-python``).

    Reads ``train``, ``test`` and ``meta`` from ``root/cifar-100-python`` (or ``root``, or
    ``root/cifar100[/cifar-100-python]``). Each data file is a pickled dict with ``data``
    uint8 ``[N, 3072]``, ``fine_labels`` (100 classes) and ``coarse_labels`` (20
    superclasses); ``meta`` holds ``fine_label_names`` and ``coarse_label_names``.

    Args:
      root: the folder.
      label: ``"fine"`` (100 classes) or ``"coarse"`` (20 superclasses).

    Returns:
      ``Dataset("cifar100")``: 50,000 + 10,000 images ``[N, 32, 32, 3]``.
    """
    if label not in ("fine", "coarse"):
        raise ValueError(f"cifar100: label must be 'fine' or 'coarse', got {label!r}.")
    dataset = "cifar100"
    root = _check_root(dataset, root)
    folder = _find_folder(
        dataset,
        root,
        [root / "cifar-100-python", root, root / "cifar100" / "cifar-100-python"],
        "test",
        "cifar-100-python/{train, test, meta}",
    )
    key = f"{label}_labels"
    num_classes = 100 if label == "fine" else 20
    train_rows, y_train = _cifar_batch(folder / "train", key, num_classes)
    test_rows, y_test = _cifar_batch(folder / "test", key, num_classes)
    names = None
    meta_path = folder / "meta"
    if meta_path.is_file():
        meta = normalize_keys(load_pickle(meta_path), meta_path)
        names = as_class_names(meta.get(f"{label}_label_names"))
    name = dataset if label == "fine" else "cifar100_coarse"
    return Dataset(
        name,
        _cifar_images(train_rows),
        y_train,
        _cifar_images(test_rows),
        y_test,
        num_classes,
        names,
    )


# ----------------------------------------------------------------------------------------------
# miniImageNet
# ----------------------------------------------------------------------------------------------

MINIIMAGENET_FULL = "miniImageNet_full.pickle"
MINIIMAGENET_CACHE = "mini-imagenet-cache-{}.pkl"


def _split_per_class(
    labels: np.ndarray, train_per_class: int, test_per_class: int, path: Path
) -> tuple[np.ndarray, np.ndarray]:
    train_idx, test_idx = [], []
    for c in range(int(labels.max()) + 1):
        idx = np.flatnonzero(labels == c)  # ascending sample order
        if len(idx) < train_per_class + test_per_class:
            raise ValueError(
                f"{path}: class {c} has {len(idx)} images, fewer than "
                f"train_per_class + test_per_class = {train_per_class + test_per_class}."
            )
        train_idx.append(idx[:train_per_class])
        test_idx.append(idx[train_per_class : train_per_class + test_per_class])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _check_images_84(images: np.ndarray, path: Path) -> np.ndarray:
    if images.ndim == 2 and images.shape[1] == 84 * 84 * 3:
        images = images.reshape(-1, 84, 84, 3)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"{path}: miniImageNet images must be uint8 [N, H, W, 3] (84x84), "
            f"got {images.dtype} {images.shape}."
        )
    return images


def _load_mini_full(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = normalize_keys(load_pickle(path), path)
    for key in ("images", "labels"):
        if key not in d:
            raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(d)}).")
    images = _check_images_84(np.asarray(d["images"]), path)
    labels = np.asarray(d["labels"])
    if labels.ndim == 2:  # one-hot rows
        if not np.all(labels.sum(axis=1) == 1):
            raise ValueError(f"{path}: 2-D 'labels' must be one-hot rows.")
        labels = labels.argmax(axis=1)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{path}: 'labels' must be integers [{len(images)}], got {labels.dtype} {labels.shape}."
        )
    present = np.unique(labels)
    if present[0] != 0 or len(present) != present[-1] + 1:
        raise ValueError(
            f"{path}: labels must cover 0..K-1 without gaps, got {len(present)} distinct "
            f"labels in [{present[0]}, {present[-1]}]."
        )
    return images, _as_labels(labels, f"{path} ['labels']")


def _cache_indices(idx: Any, used: np.ndarray, path: Path, wnid: str) -> np.ndarray:
    """A class's image indices into a cache file's ``image_data``, checked: integers in
    range (no negative ones wrapping to the end, no 0.7 truncated to 0), each image in one
    class only."""
    where = f"{path}: class_dict[{wnid!r}]"
    arr = np.asarray(idx)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{where} must be a non-empty list of image indices, got {arr.shape}.")
    if arr.dtype == object or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{where}: image indices must be integers, got {arr.dtype}.")
    if arr.min() < 0 or arr.max() >= len(used):
        raise ValueError(
            f"{where}: image indices range over [{arr.min()}, {arr.max()}], outside "
            f"[0, {len(used) - 1}] for the {len(used)} images of the file."
        )
    arr = arr.astype(np.int64)
    twice = np.flatnonzero(np.bincount(arr, minlength=len(used)) > 1)
    again = arr[used[arr]]  # already in an earlier class
    if len(twice) or len(again):
        image = int(again[0] if len(again) else twice[0])
        raise ValueError(f"{where}: image {image} is listed more than once.")
    used[arr] = True
    return arr


def _load_mini_cache(folder: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    per_class: dict[str, np.ndarray] = {}
    for split in ("train", "val", "test"):
        path = folder / MINIIMAGENET_CACHE.format(split)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing miniImageNet cache file.")
        d = normalize_keys(load_pickle(path), path)
        for key in ("image_data", "class_dict"):
            if key not in d:
                raise ValueError(f"{path}: no {key!r} entry (keys: {sorted(d)}).")
        images = _check_images_84(np.asarray(d["image_data"]), path)
        class_dict = normalize_keys(d["class_dict"], path)
        if len(images) == 0 or not class_dict:
            raise ValueError(
                f"{path}: empty miniImageNet split ({len(images)} images, "
                f"{len(class_dict)} classes)."
            )
        used = np.zeros(len(images), bool)
        for wnid, idx in class_dict.items():
            if wnid in per_class:
                raise ValueError(f"{path}: class {wnid!r} also appears in another split.")
            per_class[wnid] = images[_cache_indices(idx, used, path, wnid)]
    names = tuple(sorted(per_class))
    images = np.concatenate([per_class[n] for n in names])
    labels = np.concatenate([np.full(len(per_class[n]), i, np.int32) for i, n in enumerate(names)])
    return images, labels, names


def load_miniimagenet(
    root: str | Path, *, train_per_class: int = 500, test_per_class: int = 100
) -> Dataset:
    """Loads 84x84 miniImageNet (100 classes of 600 images) as used by continual learning.

    Two on-disk layouts are read:

    1. ``miniImageNet_full.pickle`` — the file of the A-GEM / ORTHOG-SUBSPACE code, which
       the RGO reference code also reads: a pickled dict ``{"images": uint8 [60000, 84, 84,
       3] (RGB, NHWC), "labels": int [60000] with values 0..99}`` (600 images per class).
       The split follows that code: for every class, its first ``train_per_class`` (500)
       images in file order are training data and the next ``test_per_class`` (100) are
       test data. Looked up as ``root`` (the file itself), ``root/miniImageNet_full.pickle``,
       ``root/miniImageNet_Dataset/...`` and ``root/miniimagenet/...``.
    2. The few-shot "cache" layout ``mini-imagenet-cache-{train,val,test}.pkl`` (64/16/20
       classes), each a dict ``{"image_data": uint8 [n, 84, 84, 3], "class_dict": {wnid:
       [indices]}}``. All 100 classes are pooled, numbered in sorted wnid order, and split
       per class as above. (Class numbering differs from layout 1.)

    Pickles are read with the restricted unpickler. Memory: the float32 result is about
    5 GB for the full data set.

    Args:
      root: a folder as above, or the path of ``miniImageNet_full.pickle``.
      train_per_class: training images per class (first ones in file order).
      test_per_class: test images per class (the ones after those).

    Returns:
      ``Dataset("miniimagenet")`` with images ``[N, 84, 84, 3]``.
    """
    dataset = "miniimagenet"
    root = _check_root(dataset, root)
    names: tuple[str, ...] | None = None
    if root.is_file():
        path = root
        images, labels = _load_mini_full(path)
    else:
        folders = [root, root / "miniImageNet_Dataset", root / "miniimagenet"]
        full = next(
            (d / MINIIMAGENET_FULL for d in folders if (d / MINIIMAGENET_FULL).is_file()), None
        )
        cache = next(
            (d for d in folders if (d / MINIIMAGENET_CACHE.format("train")).is_file()), None
        )
        if full is not None:
            path = full
            images, labels = _load_mini_full(path)
        elif cache is not None:
            path = cache
            images, labels, names = _load_mini_cache(cache)
        else:
            raise _not_found(
                dataset,
                root,
                folders,
                f"{MINIIMAGENET_FULL} or {MINIIMAGENET_CACHE.format('{train,val,test}')}",
            )
    tr, te = _split_per_class(labels, train_per_class, test_per_class, path)
    num_classes = int(labels.max()) + 1
    return Dataset(
        dataset,
        _to_unit_float(images[tr], str(path)),
        labels[tr],
        _to_unit_float(images[te], str(path)),
        labels[te],
        num_classes,
        names,
    )


# ----------------------------------------------------------------------------------------------
# Generic npz and scikit-learn digits
# ----------------------------------------------------------------------------------------------


def _npz_inputs(x: np.ndarray, path: Path, key: str) -> np.ndarray:
    if x.dtype == np.uint8:
        x = _to_unit_float(x, f"{path}[{key}]")
    elif np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    else:
        raise ValueError(f"{path}: {key!r} must be uint8 pixels or floating point, got {x.dtype}.")
    if x.ndim == 3:  # [N, H, W] grey images
        x = x[..., None]
    if x.ndim < 2:
        raise ValueError(f"{path}: {key!r} must be [N, ...], got shape {x.shape}.")
    return x


def _npz_labels(y: np.ndarray, path: Path, key: str) -> np.ndarray:
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"{path}: {key!r} must be integer class ids [N], got {y.dtype} {y.shape} "
            "(one-hot labels: store argmax instead)."
        )
    return _as_labels(y, f"{path} [{key!r}]")


def load_npz(path: str | Path) -> Dataset:
    """Loads a data set from an ``.npz`` file with ``x_train, y_train, x_test, y_test``.

    ``x_*`` may be uint8 pixels (divided by 255) or floats (kept, as float32); ``[N, H, W]``
    gets a channel axis. ``y_*`` are integer class ids. Optional keys: ``num_classes``
    (otherwise one more than the largest label) and ``class_names`` (a string array).
    Read with ``allow_pickle=False``: object arrays are refused.

    Args:
      path: the ``.npz`` file.

    Returns:
      A ``Dataset`` named after the file stem.

    Examples:
      >>> import os, tempfile, numpy as np
      >>> f = os.path.join(tempfile.mkdtemp(), "toy.npz")
      >>> np.savez(f, x_train=np.zeros((3, 4, 4), np.uint8), y_train=np.array([0, 1, 2]),
      ...          x_test=np.zeros((1, 4, 4), np.uint8), y_test=np.array([1]))
      >>> load_npz(f)
      Dataset('toy', train=3, test=1, input_shape=(4, 4, 1), num_classes=3)
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"npz data file {path} does not exist.")
    try:
        npz = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{path}: cannot read as .npz without pickle ({e}).") from e
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz archive, truncated or corrupt ({e}).") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ValueError(
            f"{path}: holds a single .npy array, not an .npz archive of x_train, y_train, "
            "x_test, y_test (write it with np.savez)."
        )
    with npz:
        keys = set(npz.files)
        for key in ("x_train", "y_train", "x_test", "y_test"):
            if key not in keys:
                raise KeyError(f"{path}: missing array {key!r} (has: {sorted(keys)}).")
        try:
            x_train = _npz_inputs(npz["x_train"], path, "x_train")
            x_test = _npz_inputs(npz["x_test"], path, "x_test")
            y_train = _npz_labels(npz["y_train"], path, "y_train")
            y_test = _npz_labels(npz["y_test"], path, "y_test")
            num_classes = (
                int(npz["num_classes"])
                if "num_classes" in keys
                else int(max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)
            )
            names = (
                tuple(str(s) for s in npz["class_names"].tolist())
                if "class_names" in keys
                else None
            )
        except ValueError as e:
            if "allow_pickle" in str(e):
                raise ValueError(
                    f"{path}: holds object arrays, refused (allow_pickle=False)."
                ) from e
            raise
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            raise ValueError(f"{path}: a member of the .npz archive is corrupt ({e}).") from e
    try:
        return Dataset(path.stem, x_train, y_train, x_test, y_test, num_classes, names)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), with a fixed stratified split.

    Pixel values 0..16 are scaled to ``[0, 1]``; images are ``[N, 8, 8, 1]``. The split is
    :func:`stratified_split` of the labels (20% test, seed 0 by default), so it is the same
    on every machine. Needs scikit-learn (imported here, lazily).

    Examples:
      >>> ds = load_digits()
      >>> ds.input_shape, len(ds.x_train) + len(ds.x_test), float(ds.x_train.max())
      ((8, 8, 1), 1797, 1.0)
    """
    try:
        from sklearn.datasets import load_digits as _sk_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("load_digits needs scikit-learn: pip install scikit-learn") from e
    bunch = _sk_digits()
    x = (np.asarray(bunch.images, np.float32) / np.float32(16.0))[..., None]
    y = np.asarray(bunch.target, np.int32)
    train, test = stratified_split(y, test_fraction, seed)
    return Dataset("digits", x[train], y[train], x[test], y[test], 10, MNIST_CLASSES)


# ----------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------

_ALIASES = {
    "mnist": "mnist",
    "fashion_mnist": "fashion_mnist",
    "fashion-mnist": "fashion_mnist",
    "fashionmnist": "fashion_mnist",
    "notmnist": "notmnist",
    "not_mnist": "notmnist",
    "cifar10": "cifar10",
    "cifar-10": "cifar10",
    "cifar100": "cifar100",
    "cifar-100": "cifar100",
    "miniimagenet": "miniimagenet",
    "mini_imagenet": "miniimagenet",
    "mini-imagenet": "miniimagenet",
    "digits": "digits",
}


def canonical_name(name: str) -> str:
    """Maps a data set name or alias (``"Fashion-MNIST"``) to its canonical form."""
    key = name.strip().lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown data set {name!r}; known: {', '.join(DATASET_NAMES)}, "
            "or a path to an .npz file."
        )
    return _ALIASES[key]


def load_dataset(name: str, data_dir: str | Path | None = None, **kwargs: Any) -> Dataset:
    """Loads a data set by name, or from an ``.npz`` path.

    Names: ``mnist``, ``fashion_mnist``, ``notmnist``, ``cifar10``, ``cifar100``,
    ``miniimagenet``, ``digits`` (bundled, needs no files); anything ending in ``.npz`` is
    read with :func:`load_npz`, and any other name (e.g. ``svhn``) as ``<name>.npz`` or
    ``<name>/<name>.npz`` in the data folder. The folder is ``data_dir``, else
    ``$RGO_DATA_DIR``, else ``~/.cache/rgo_jax``; each loader also looks in its usual
    subfolder (``mnist/``, ``cifar-10-batches-py/``, ...). Never downloads: call
    :func:`rgo_jax.bench.data.download`.

    Args:
      name: data set name (case-insensitive, ``-``/``_`` aliases accepted) or ``.npz`` path.
      data_dir: the data folder.
      **kwargs: passed to the loader (e.g. ``label="coarse"`` for CIFAR-100).

    Returns:
      The ``Dataset``.

    Raises:
      FileNotFoundError: naming the path tried and how to fix it.
    """
    if str(name).lower().endswith(".npz"):
        return load_npz(name)
    root = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if name.strip().lower() not in _ALIASES:
        # any other data set (e.g. SVHN) stored as ``<name>.npz`` in the data folder
        for candidate in (root / f"{name}.npz", root / name / f"{name}.npz"):
            if candidate.is_file():
                return load_npz(candidate)
        raise ValueError(
            f"unknown data set {name!r}: not one of {', '.join(DATASET_NAMES)}, and no "
            f"{name}.npz in {root} (or {root / name}); a path to an .npz file also works."
        )
    key = canonical_name(name)
    if key == "digits":
        return load_digits(**kwargs)
    loader = {
        "mnist": load_mnist,
        "fashion_mnist": load_fashion_mnist,
        "notmnist": load_notmnist,
        "cifar10": load_cifar10,
        "cifar100": load_cifar100,
        "miniimagenet": load_miniimagenet,
    }[key]
    return loader(root, **kwargs)
