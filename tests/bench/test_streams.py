"""Task streams: permuted, rotated, class-split, multi-dataset; laziness; image operations."""

from __future__ import annotations

import gc
import tracemalloc
import weakref

import numpy as np
import pytest
from scipy import ndimage

from rgo_jax.bench import data
from rgo_jax.bench.data import Dataset
from tests.helpers import SHARED_DATA as DATASETS


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    if not (DATASETS / "mnist").exists():
        pytest.skip("MNIST not available")
    return data.load_mnist(DATASETS)


@pytest.fixture(scope="module")
def digits() -> Dataset:
    return data.load_digits()


def _rows(x: np.ndarray) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1)}


# ---------------------------------------------------------------- permuted


def test_permuted_task0_identity_and_permutation(mnist):
    stream = data.permuted(mnist, 20, seed=7, max_train_per_task=300, max_test_per_task=100)
    assert len(stream) == stream.num_tasks == 20 and stream.num_classes == 10
    assert stream.input_shape == (28, 28, 1)
    t0 = stream[0]
    # task 0: a subsample of the untouched data set
    assert _rows(t0.x_train) <= _rows(mnist.x_train)
    t5 = stream[5]
    perm = data.pixel_permutation(7, 5, 784)
    assert sorted(perm.tolist()) == list(range(784))  # a bijection of pixels
    assert not np.array_equal(perm, np.arange(784))
    # undo the permutation: every row of task 5 is a row of MNIST
    inv = np.argsort(perm)
    undone = t5.x_train.reshape(len(t5.x_train), -1)[:, inv]
    assert _rows(undone) <= _rows(mnist.x_train)
    assert t5.classes.tolist() == list(range(10)) and stream.class_mask(5).all()


def test_permuted_matches_definition_on_full_data(digits):
    stream = data.permuted(digits, 4, seed=1)
    for t in range(4):
        task = stream[t]
        perm = data.pixel_permutation(1, t, 64)
        expected = digits.x_train.reshape(-1, 64)[:, perm].reshape(digits.x_train.shape)
        np.testing.assert_array_equal(task.x_train, expected)
        np.testing.assert_array_equal(task.y_test, digits.y_test)
        np.testing.assert_array_equal(
            np.sort(task.x_test.reshape(-1, 64), 1), np.sort(digits.x_test.reshape(-1, 64), 1)
        )
    np.testing.assert_array_equal(stream[0].x_train, digits.x_train)


def test_permuted_identity_task_shares_the_data_read_only(digits):
    """Task 0 of a stream with an identity first task is the data set itself (no copy), and
    read-only: a write into the split raises instead of changing the data set."""
    before = digits.x_train.copy()
    task = data.permuted(digits, 2, seed=0)[0]
    assert np.shares_memory(task.x_train, digits.x_train)
    with pytest.raises(ValueError, match="read-only"):
        task.x_train[0] += 1.0
    np.testing.assert_array_equal(digits.x_train, before)
    other = data.permuted(digits, 2, seed=0)[1].x_train  # a permuted task is a fresh array
    assert not np.shares_memory(other, digits.x_train) and other.flags.writeable


def test_permuted_deterministic_and_seeded(digits):
    a = data.permuted(digits, 3, seed=0)[2].x_train
    b = data.permuted(digits, 3, seed=0)[2].x_train
    c = data.permuted(digits, 3, seed=1)[2].x_train
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    perms = {data.pixel_permutation(0, t, 64).tobytes() for t in range(1, 10)}
    assert len(perms) == 9  # distinct tasks get distinct permutations
    no_id = data.permuted(digits, 2, seed=0, first_task_identity=False)[0].x_train
    assert not np.array_equal(no_id, digits.x_train)


def test_streams_are_lazy(mnist):
    tracemalloc.start()
    stream = data.permuted(mnist, 20, seed=0)
    built, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert built < 1_000_000  # building the stream allocates no task data
    alive = []
    for task in data.permuted(mnist, 20, seed=0, max_train_per_task=200, max_test_per_task=50):
        alive.append(weakref.ref(task.x_train))
        del task
    gc.collect()
    assert sum(r() is not None for r in alive) <= 1  # only the cached last task remains
    # get_split builds one split only, equal to the full task's
    x, y = stream.get_split(3, "test")
    np.testing.assert_array_equal(x, stream[3].x_test)
    np.testing.assert_array_equal(y, mnist.y_test)


def test_indexing(digits):
    stream = data.permuted(digits, 3, seed=0)
    np.testing.assert_array_equal(stream[-1].x_test, stream[2].x_test)
    with pytest.raises(IndexError, match="task 3 out of range"):
        stream[3]
    with pytest.raises(TypeError):
        stream[1.0]
    assert [t.task_id for t in stream] == [0, 1, 2]


# ---------------------------------------------------------------- rotated


def test_rotated_angles_and_pixels(mnist):
    stream = data.rotated(mnist, 20, seed=3, max_train_per_task=20, max_test_per_task=10)
    angles = stream.meta["angles"]
    assert len(angles) == 20
    for t, a in enumerate(angles):
        assert 9.0 * t <= a < 9.0 * t + 9.0
    np.testing.assert_array_equal(angles, data.rotated(mnist, 20, seed=3).meta["angles"])
    assert not np.array_equal(angles, data.rotated(mnist, 20, seed=4).meta["angles"])
    # the images are MNIST rotated as scipy does it (the reference code's rotation)
    small = Dataset(
        "small", mnist.x_train[:8], mnist.y_train[:8], mnist.x_test[:8], mnist.y_test[:8], 10
    )
    small_stream = data.rotated(small, 20, seed=3)
    for t in (0, 13, 19):
        task = small_stream[t]
        np.testing.assert_array_equal(task.y_test, mnist.y_test[:8])
        for i in range(8):
            ref = ndimage.rotate(
                mnist.x_test[i, :, :, 0].astype(np.float64), angles[t], reshape=False, order=1
            )
            np.testing.assert_allclose(task.x_test[i, :, :, 0], ref, atol=1e-5)
    # subsampled tasks hold rotated MNIST rows
    sub = stream[13]
    assert len(sub.x_train) == 20 and len(sub.x_test) == 10
    rotated_all = data.rotate_images(mnist.x_test, angles[13])
    assert _rows(sub.x_test) <= _rows(rotated_all)


@pytest.mark.parametrize("angle", [0.0, 9.7, 45.0, 90.0, 133.3, 180.0, -20.0, 271.0])
def test_rotate_images_matches_scipy(angle):
    rng = np.random.default_rng(0)
    x = rng.random((3, 11, 14, 2)).astype(np.float32)
    ref = np.stack(
        [
            ndimage.rotate(x[i].astype(np.float64), angle, axes=(1, 0), reshape=False, order=1)
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(data.rotate_images(x, angle), ref, atol=1e-5)


def test_rotate_four_quarter_turns_is_identity():
    x = np.random.default_rng(1).random((2, 9, 9, 1)).astype(np.float32)
    y = x
    for _ in range(4):
        y = data.rotate_images(y, 90.0)
    np.testing.assert_array_equal(y, x)


# ---------------------------------------------------------------- class split


def test_class_split_partitions(mnist):
    stream = data.class_split(mnist, 5, seed=11)
    groups = [stream.task_classes(t) for t in range(5)]
    flat = np.concatenate(groups)
    assert sorted(flat.tolist()) == list(range(10)) and len(set(flat.tolist())) == 10
    counts = np.bincount(mnist.y_train, minlength=10)
    for t, g in enumerate(groups):
        assert len(g) == 2 and np.all(np.diff(g) > 0)
        y = stream.get_split(t, "train")[1]
        assert set(np.unique(y).tolist()) == set(g.tolist())
        assert len(y) == counts[g].sum()  # every sample of the task's classes, nothing else
        assert stream.class_mask(t).tolist() == [c in g for c in range(10)]
    assert stream.class_masks().sum(0).tolist() == [1] * 10
    order = data.class_split(mnist, 5, seed=12).meta["class_order"]
    assert not np.array_equal(order, stream.meta["class_order"])


def test_class_split_options_and_errors(digits):
    s = data.class_split(digits, 3, seed=0, classes_per_task=3, shuffle_classes=False)
    assert [s.task_classes(t).tolist() for t in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="cannot make 11 tasks"):
        data.class_split(digits, 11, seed=0)
    with pytest.raises(ValueError, match="cannot make 4 tasks of 3 classes"):
        data.class_split(digits, 4, seed=0, classes_per_task=3)


def test_subsampling_seeded_subset(digits):
    kw = dict(max_train_per_task=30, max_test_per_task=10)
    s1 = data.class_split(digits, 5, seed=2, **kw)
    s2 = data.class_split(digits, 5, seed=2, **kw)
    full = data.class_split(digits, 5, seed=2)
    for t in range(5):
        a, b = s1[t], s2[t]
        assert len(a.x_train) == 30 and len(a.x_test) == 10
        np.testing.assert_array_equal(a.x_train, b.x_train)
        assert _rows(a.x_train) <= _rows(full[t].x_train)
        assert set(a.y_train.tolist()) <= set(a.classes.tolist())


def test_first_samples_subsample_is_the_same_for_every_task(digits):
    """``subsample="first"`` keeps the first samples of the split (of the task's classes)
    for every task, as GPM's code keeps the first 54,000 MNIST images: each permuted task
    is the same images, permuted; the default draws another random subset per task."""
    kw = dict(max_train_per_task=40, max_test_per_task=15)
    first = data.permuted(digits, 3, seed=4, subsample="first", **kw)
    size = int(np.prod(digits.input_shape))
    for t in range(3):
        perm = data.pixel_permutation(4, t, size)
        for x, y, base_x, base_y, n in (
            (first[t].x_train, first[t].y_train, digits.x_train, digits.y_train, 40),
            (first[t].x_test, first[t].y_test, digits.x_test, digits.y_test, 15),
        ):
            want = base_x[:n].reshape(n, size)[:, perm].reshape(x.shape)
            np.testing.assert_array_equal(x, want)
            np.testing.assert_array_equal(y, base_y[:n])
    rand = data.permuted(digits, 3, seed=4, **kw)
    assert not np.array_equal(rand[1].y_train, rand[2].y_train)  # a subset per task
    # class splits: the first samples of the task's classes
    split = data.class_split(digits, 5, seed=2, subsample="first", max_train_per_task=30)
    for t in range(5):
        index = np.flatnonzero(np.isin(digits.y_train, split[t].classes))[:30]
        np.testing.assert_array_equal(split[t].x_train, digits.x_train[index])
    multi = data.multi_dataset([digits], image_shape=(8, 8, 1), subsample="first", **kw)
    np.testing.assert_array_equal(multi[0].y_train, digits.y_train[:40])
    with pytest.raises(ValueError, match="subsample must be one of"):
        data.permuted(digits, 2, subsample="last", **kw)


# ---------------------------------------------------------------- multi-dataset


def test_multi_dataset_offsets_and_shapes(digits):
    rng = np.random.default_rng(0)
    colour = Dataset(
        "colour",
        rng.random((12, 20, 20, 3)).astype(np.float32),
        np.arange(12, dtype=np.int32) % 3,
        rng.random((6, 20, 20, 3)).astype(np.float32),
        np.arange(6, dtype=np.int32) % 3,
        3,
    )
    stream = data.multi_dataset([digits, colour], image_shape=(16, 16, 3), max_train_per_task=50)
    assert stream.num_classes == 13 and stream.input_shape == (16, 16, 3)
    assert stream.meta["offsets"].tolist() == [0, 10]
    t0, t1 = stream[0], stream[1]
    assert t0.x_train.shape == (50, 16, 16, 3) and t1.x_train.shape == (12, 16, 16, 3)
    assert t1.classes.tolist() == [10, 11, 12]
    np.testing.assert_array_equal(t1.y_test, colour.y_test + 10)
    np.testing.assert_array_equal(t0.x_train[..., 0], t0.x_train[..., 2])  # grey -> 3 channels
    # resizing agrees with jax.image.resize (independent implementation)
    import jax
    import jax.numpy as jnp

    ref = jax.image.resize(jnp.asarray(colour.x_test), (6, 16, 16, 3), "linear", antialias=True)
    np.testing.assert_allclose(t1.x_test, np.asarray(ref), atol=1e-5)
    assert stream.class_masks().sum(1).tolist() == [10, 3]


@pytest.mark.parametrize("src, dst", [((28, 28), (32, 32)), ((84, 84), (32, 32)), ((5, 7), (9, 4))])
def test_resize_matches_jax(src, dst):
    import jax
    import jax.numpy as jnp

    x = np.random.default_rng(2).random((2, *src, 3)).astype(np.float32)
    ref = jax.image.resize(jnp.asarray(x), (2, *dst, 3), "linear", antialias=True)
    np.testing.assert_allclose(data.resize_images(x, dst), np.asarray(ref), atol=1e-5)


def test_from_tasks(digits):
    tasks = list(data.class_split(digits, 2, seed=0, classes_per_task=2))
    stream = data.TaskStream.from_tasks(tasks, num_classes=10)
    assert len(stream) == 2 and stream.class_mask(1).sum() == 2
    assert stream[1] is not None and stream[1].name == tasks[1].name
