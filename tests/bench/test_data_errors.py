"""Bad data files: memory bombs are refused cheaply, out-of-range values never wrap around,
and every malformed file gets an error naming the file and the problem."""

from __future__ import annotations

import gzip
import pickle
import struct
import tracemalloc

import numpy as np
import pytest

from rgo_jax.bench import data
from rgo_jax.bench.data import Dataset, UnsafePickleError
from rgo_jax.bench.data import _pickle as pickle_module


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        try:
            fn()
        except Exception as err:  # noqa: BLE001 - the caller checks the error
            result = err
        else:
            result = None
        return tracemalloc.get_traced_memory()[1], result
    finally:
        tracemalloc.stop()


# ------------------------------------------------------------------------------ memory bombs


def test_a_gzip_idx_bomb_is_not_inflated_past_its_declared_size(tmp_path):
    head = struct.pack(">BBBBI", 0, 0, 8, 1, 10)  # labels: 10 bytes declared
    bomb = tmp_path / "bomb-labels-idx1-ubyte.gz"
    bomb.write_bytes(gzip.compress(head + bytes(40 << 20), compresslevel=9))  # 40 MB of zeros
    assert bomb.stat().st_size < 100_000
    peak, err = _peak_bytes(lambda: data.read_idx(bomb))
    assert isinstance(err, ValueError) and "trailing bytes" in str(err) and bomb.name in str(err)
    assert peak < 8 << 20, f"inflated {peak} bytes"


def test_idx_dimensions_overflowing_int64_are_a_clear_error(tmp_path):
    f = tmp_path / "huge-idx3-ubyte"
    f.write_bytes(struct.pack(">BBBB3I", 0, 0, 8, 3, *(3 * [0xFFFFFFFF])) + b"\0" * 8)
    with pytest.raises(ValueError, match="more than any array can hold") as err:
        data.read_idx(f)
    assert f.name in str(err.value)


def _bytearray_pickle(n: int) -> bytes:
    # builtins.bytearray(n): a few bytes of pickle asking for n zero bytes.
    arg = b"J" + struct.pack("<i", n) if n < 2**31 else b"\x8a\x08" + struct.pack("<q", n)
    return b"\x80\x02c__builtin__\nbytearray\n" + arg + b"\x85R."


@pytest.mark.parametrize("n", [2**30, 2**62])
def test_a_pickle_allocating_a_huge_bytearray_is_refused(tmp_path, n):
    f = tmp_path / "bomb.pkl"
    f.write_bytes(_bytearray_pickle(n))
    assert len(f.read_bytes()) < 40
    peak, err = _peak_bytes(lambda: data.load_pickle(f))
    assert isinstance(err, UnsafePickleError), err
    assert str(f) in str(err) and "bytearray" in str(err)
    assert peak < 1 << 20


def test_bytearrays_as_pickle_writes_them_still_load(tmp_path):
    for protocol in (2, 4, 5):
        f = tmp_path / f"ok{protocol}.pkl"
        f.write_bytes(pickle.dumps({"b": bytearray(b"\x00\xffab")}, protocol=protocol))
        assert data.load_pickle(f)["b"] == bytearray(b"\x00\xffab")


def test_a_pickle_reconstructing_a_huge_array_is_refused(tmp_path):
    f = tmp_path / "arr.pkl"
    f.write_bytes(
        b"\x80\x02cnumpy._core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        + b"\x8a\x08"
        + struct.pack("<q", 2**40)
        + b"\x85C\x01b\x87R."
    )
    with pytest.raises(UnsafePickleError, match="allocate"):
        data.load_pickle(f)


def test_out_of_memory_while_unpickling_names_the_file(tmp_path, monkeypatch):
    f = tmp_path / "big.pkl"
    f.write_bytes(pickle.dumps([1, 2, 3]))

    def no_memory(self):
        raise MemoryError

    monkeypatch.setattr(pickle_module._RestrictedUnpickler, "load", no_memory)
    with pytest.raises(MemoryError, match="big.pkl: out of memory while unpickling"):
        data.load_pickle(f)


# ------------------------------------------------------------------------------ wraparound


def _cifar10_folder(tmp_path, labels):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = np.zeros((len(labels), 3072), np.uint8)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rows, "labels": np.asarray(labels)}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    return folder


def test_cifar_labels_beyond_int32_do_not_wrap(tmp_path):
    _cifar10_folder(tmp_path, np.array([2**32 + 3, 1], np.int64))
    with pytest.raises(ValueError, match=r"data_batch_1 \['labels'\]: labels range over") as err:
        data.load_cifar10(tmp_path)
    assert "4294967299" in str(err.value)


def test_cifar_labels_in_range_still_load(tmp_path):
    _cifar10_folder(tmp_path, np.array([3, 1], np.uint64))
    assert data.load_cifar10(tmp_path).y_train.tolist() == [3, 1] * 5


def _npz(tmp_path, **arrays):
    f = tmp_path / "toy.npz"
    base = dict(
        x_train=np.zeros((2, 4), np.float32),
        y_train=np.array([0, 1]),
        x_test=np.zeros((1, 4), np.float32),
        y_test=np.array([1]),
    )
    np.savez(f, **{**base, **arrays})
    return f


def test_npz_uint64_labels_do_not_wrap(tmp_path):
    f = _npz(tmp_path, y_train=np.array([2**32 + 1, 0], np.uint64))
    with pytest.raises(
        ValueError, match=r"toy.npz \['y_train'\]: labels range over \[0, 4294967297\]"
    ):
        data.load_npz(f)
    f = _npz(tmp_path, y_train=np.array([1, 0], np.uint64))
    assert data.load_npz(f).y_train.tolist() == [1, 0]


def _mini_cache(tmp_path, class_dicts, n_images=4):
    images = np.zeros((n_images, 84, 84, 3), np.uint8)
    for split, cd in zip(("train", "val", "test"), class_dicts, strict=True):
        d = {"image_data": images, "class_dict": cd}
        (tmp_path / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(d))


@pytest.mark.parametrize(
    "indices, message",
    [
        ({"a": [0, -1]}, "image indices range over [-1, 0], outside [0, 3]"),
        ({"a": [0, -2]}, "image indices range over [-2, 0]"),
        ({"a": [0, 4]}, "outside [0, 3] for the 4 images"),
        ({"a": [0, 1], "b": [1, 2]}, "class_dict['b']: image 1 is listed more than once"),
        ({"a": [2, 2]}, "class_dict['a']: image 2 is listed more than once"),
        ({"a": [0.7, 1.0]}, "image indices must be integers, got float64"),
        ({"a": []}, "must be a non-empty list of image indices"),
    ],
)
def test_miniimagenet_cache_indices_are_checked(tmp_path, indices, message):
    _mini_cache(tmp_path, [indices, {"v": [0]}, {"t": [0]}])
    with pytest.raises(ValueError) as err:
        data.load_miniimagenet(tmp_path, train_per_class=1, test_per_class=0)
    assert message in str(err.value) and "mini-imagenet-cache-train.pkl" in str(err.value)


def test_an_empty_miniimagenet_split_names_the_file(tmp_path):
    _mini_cache(tmp_path, [{"a": [0, 1]}, {}, {"t": [0]}])
    with pytest.raises(ValueError, match=r"cache-val.pkl: empty miniImageNet split \(4 images, 0"):
        data.load_miniimagenet(tmp_path, train_per_class=1, test_per_class=0)


def test_float_idx_labels_are_refused(tmp_path):
    folder = tmp_path / "mnist"
    folder.mkdir()

    def write(name, code, arr):
        arr = np.asarray(arr)
        head = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
        (folder / name).write_bytes(head + arr.tobytes())

    for prefix in ("train", "t10k"):
        write(f"{prefix}-images-idx3-ubyte", 0x08, np.zeros((2, 28, 28), np.uint8))
        write(f"{prefix}-labels-idx1-ubyte", 0x0D, np.array([0.7, 1.0], ">f4"))
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: labels must be integers"):
        data.load_mnist(tmp_path)


# ------------------------------------------------------------------------------ unclear errors


def test_a_dataset_without_samples_is_refused():
    y = np.zeros(0, np.int32)
    with pytest.raises(ValueError, match="x_train holds no samples"):
        Dataset("toy", np.zeros((0, 3), np.float32), y, np.zeros((1, 3), np.float32), y[:0] + 0, 2)


def test_an_npz_without_training_images_names_the_file(tmp_path):
    f = _npz(tmp_path, x_train=np.zeros((0, 4), np.float32), y_train=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match=r"toy.npz: .*x_train holds no samples"):
        data.load_npz(f)


def test_a_truncated_npz_names_the_file(tmp_path):
    f = _npz(tmp_path)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(ValueError, match="toy.npz: not a readable .npz archive"):
        data.load_npz(f)


def test_npy_bytes_named_npz_are_a_clear_error(tmp_path):
    f = tmp_path / "toy.npz"
    with open(f, "wb") as fh:
        np.save(fh, np.zeros(3))
    with pytest.raises(ValueError, match="toy.npz: holds a single .npy array, not an .npz"):
        data.load_npz(f)


def test_a_class_split_task_without_test_samples_is_named():
    x = np.zeros((4, 2), np.float32)
    ds = Dataset("toy", x, np.arange(4, dtype=np.int32), x, np.array([0, 0, 1, 1], np.int32), 4)
    stream = data.class_split(ds, 2, shuffle_classes=False)
    assert len(stream.get_split(0, "test")[1]) == 4
    with pytest.raises(ValueError, match=r"task 1 has no test samples \(its classes \[2, 3\]"):
        stream.get_split(1, "test")
