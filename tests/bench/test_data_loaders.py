"""Loaders: real MNIST / Fashion-MNIST / CIFAR-10, and small files in the exact formats."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rgo_jax.bench import data
from rgo_jax.bench.data import Dataset, UnsafePickleError
from tests.helpers import REPO, SHARED

DATASETS = SHARED / "datasets"

# Published facts about MNIST (class counts of the official train / test sets).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"data not available: {path.name}")
    return path


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return data.load_mnist(_need(DATASETS / "mnist").parent)


# ---------------------------------------------------------------- helpers writing real formats


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, code, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    dt = {0x08: ">u1", 0x0C: ">i4"}[code]
    return header + arr.astype(dt).tobytes()


def write_idx_set(folder: Path, x_tr, y_tr, x_te, y_te, *, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in (
        ("train-images-idx3-ubyte", x_tr),
        ("train-labels-idx1-ubyte", y_tr),
        ("t10k-images-idx3-ubyte", x_te),
        ("t10k-labels-idx1-ubyte", y_te),
    ):
        raw = idx_bytes(np.asarray(arr, np.uint8))
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)


def cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


# Python 2 pickles, written opcode by opcode as Python 2 + numpy wrote the official CIFAR files
# (keys and raw array data are Python 2 ``str``; numpy under its old ``numpy.core`` name).
def _py2_str(b: bytes) -> bytes:
    return (b"U" + bytes([len(b)]) if len(b) < 256 else b"T" + struct.pack("<I", len(b))) + b


def _py2_int(i: int) -> bytes:
    return b"K" + bytes([i]) if 0 <= i < 256 else b"J" + struct.pack("<i", i)


def _py2_uint8_array(a: np.ndarray) -> bytes:
    shape = b"(" + b"".join(_py2_int(d) for d in a.shape) + b"t"
    dtype = (
        b"cnumpy\ndtype\n"
        + _py2_str(b"u1")
        + _py2_int(0)
        + _py2_int(1)
        + b"\x87R"
        + b"("
        + _py2_int(3)
        + _py2_str(b"|")
        + b"NNN"
        + _py2_int(-1)
        + _py2_int(-1)
        + _py2_int(0)
        + b"tb"
    )
    return (
        b"cnumpy.core.multiarray\n_reconstruct\n"
        + b"cnumpy\nndarray\n"
        + _py2_int(0)
        + b"\x85"
        + _py2_str(b"b")
        + b"\x87R"
        + b"("
        + _py2_int(1)
        + shape
        + dtype
        + b"\x89"
        + _py2_str(a.astype(np.uint8).tobytes())
        + b"tb"
    )


def py2_pickle_dict(items: dict[bytes, object]) -> bytes:
    body = b""
    for k, v in items.items():
        if isinstance(v, np.ndarray):
            val = _py2_uint8_array(v)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            val = b"](" + b"".join(_py2_str(e) for e in v) + b"e"
        elif isinstance(v, list):
            val = b"](" + b"".join(_py2_int(int(e)) for e in v) + b"e"
        else:
            val = _py2_str(v)
        body += _py2_str(k) + val
    return b"\x80\x02}(" + body + b"u."


# ---------------------------------------------------------------- real MNIST / Fashion-MNIST


def test_mnist_known_facts(mnist):
    assert mnist.x_train.shape == (60000, 28, 28, 1) and mnist.x_test.shape == (10000, 28, 28, 1)
    assert mnist.x_train.dtype == np.float32 and mnist.y_train.dtype == np.int32
    assert np.bincount(mnist.y_train).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.y_test).tolist() == MNIST_TEST_COUNTS
    assert mnist.y_train[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0
    # pixels are k / 255 for integers k
    k = mnist.x_test[:100] * 255.0
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert mnist.num_classes == 10 and mnist.class_names == tuple("0123456789")


def test_mnist_pixels_match_raw_idx(mnist):
    raw = gzip.decompress((DATASETS / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes())
    assert struct.unpack(">IIII", raw[:16]) == (2051, 10000, 28, 28)
    first = np.frombuffer(raw[16 : 16 + 784], np.uint8).reshape(28, 28)
    np.testing.assert_array_equal(mnist.x_test[0, :, :, 0], first.astype(np.float32) / 255)


def test_mnist_root_or_subfolder(mnist):
    direct = data.load_mnist(DATASETS / "mnist")
    np.testing.assert_array_equal(direct.x_train[:50], mnist.x_train[:50])
    np.testing.assert_array_equal(direct.y_test, mnist.y_test)


def test_fashion_mnist_known_facts():
    ds = data.load_dataset("Fashion-MNIST", _need(DATASETS / "fashion-mnist").parent)
    assert ds.name == "fashion_mnist" and ds.x_train.shape == (60000, 28, 28, 1)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.y_train[0] == 9 and ds.class_names[9] == "Ankle boot"


# ---------------------------------------------------------------- IDX format errors


def test_idx_roundtrip_raw_and_gz_in_subfolder(tmp_path):
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    x_te = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    write_idx_set(tmp_path / "notMNIST", x_tr, [0, 9, 1, 2, 3, 4, 5], x_te, [9, 8, 7], gz=False)
    ds = data.load_notmnist(tmp_path)
    np.testing.assert_array_equal(ds.x_train[..., 0] * np.float32(255), x_tr.astype(np.float32))
    assert ds.y_train.tolist() == [0, 9, 1, 2, 3, 4, 5] and ds.class_names[9] == "J"
    assert ds.x_test.shape == (3, 28, 28, 1)


def test_truncated_idx_names_file(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_set(folder, np.zeros((5, 28, 28)), np.zeros(5), np.zeros((2, 28, 28)), np.zeros(2))
    bad = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(bad.read_bytes())
    bad.write_bytes(gzip.compress(raw[: 16 + 100]))
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz.*truncated.*5x28x28"):
        data.load_mnist(tmp_path)


def test_truncated_gzip_stream_names_file(tmp_path):
    folder = tmp_path / "mnist"
    write_idx_set(folder, np.zeros((5, 28, 28)), np.zeros(5), np.zeros((2, 28, 28)), np.zeros(2))
    bad = folder / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:20])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte\.gz.*gzip"):
        data.load_mnist(tmp_path)


@pytest.mark.parametrize(
    "payload, message",
    [
        (b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00", "magic"),
        (b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00", "type code"),
        (b"\x00\x00\x08\x03" + struct.pack(">I", 1), "truncated IDX header"),
        (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"\x00\x01\x02", "trailing"),
    ],
)
def test_malformed_idx(tmp_path, payload, message):
    f = tmp_path / "broken-idx1-ubyte"
    f.write_bytes(payload)
    with pytest.raises(ValueError, match=message) as err:
        data.read_idx(f)
    assert "broken-idx1-ubyte" in str(err.value)


def test_idx_int32_roundtrip(tmp_path):
    arr = np.array([[1, -2], [300000, 4]], np.int32)
    (tmp_path / "a-idx2-int").write_bytes(idx_bytes(arr, code=0x0C))
    out = data.read_idx(tmp_path / "a-idx2-int")
    assert out.dtype == np.int32 and out.tolist() == arr.tolist()


def test_image_label_count_mismatch(tmp_path):
    write_idx_set(tmp_path, np.zeros((3, 28, 28)), np.zeros(2), np.zeros((1, 28, 28)), np.zeros(1))
    with pytest.raises(ValueError, match=r"3 images but .* 2 labels"):
        data.load_mnist(tmp_path)


def test_missing_files_message(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.load_mnist(tmp_path)
    msg = str(err.value)
    assert str(tmp_path / "mnist") in msg and "RGO_DATA_DIR" in msg and "download" in msg


# ---------------------------------------------------------------- CIFAR-10 (real, via the tool)


PREPARED_CIFAR10 = REPO / "data"
"""Where ``.ci/run`` prepares CIFAR-10 before the tests (``cifar-10-batches-py/`` in it), as a
user would once; without it the fixture converts the JPEG archive itself (~15 s)."""


@pytest.fixture(scope="module")
def cifar10_dir(tmp_path_factory) -> Path:
    if (PREPARED_CIFAR10 / "cifar-10-batches-py" / "test_batch").exists():
        return PREPARED_CIFAR10
    tool = _need(SHARED / "tools" / "cifar10_from_jpeg.py")
    pytest.importorskip("PIL")
    out = tmp_path_factory.mktemp("cifar10")
    subprocess.run([sys.executable, str(tool), str(out)], check=True, timeout=300)
    return out


@pytest.mark.slow  # reads the 60,000 images (and converts the JPEGs first if not prepared)
def test_cifar10_real(cifar10_dir):
    ds = data.load_dataset("cifar10", cifar10_dir)
    assert ds.x_train.shape == (50000, 32, 32, 3) and ds.x_test.shape == (10000, 32, 32, 3)
    assert np.bincount(ds.y_train).tolist() == [5000] * 10
    assert np.bincount(ds.y_test).tolist() == [1000] * 10
    assert ds.class_names[:3] == ("airplane", "automobile", "bird")
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    # Layout check against the raw pickled rows: row = [R plane, G plane, B plane], 32x32 each.
    batch = pickle.loads((cifar10_dir / "cifar-10-batches-py" / "test_batch").read_bytes())
    rows = np.asarray(batch[b"data"])
    assert ds.y_test.tolist() == list(batch[b"labels"])
    for i, r, c, ch in [(0, 0, 0, 0), (7, 31, 2, 1), (9999, 13, 30, 2)]:
        assert round(float(ds.x_test[i, r, c, ch]) * 255) == rows[i, ch * 1024 + r * 32 + c]
    # the tool records each JPEG's class folder in its file name
    cls = batch[b"filenames"][0].decode().split("_", 1)[0]
    assert ds.class_names[ds.y_test[0]] == cls


# ---------------------------------------------------------------- CIFAR-100 (small, exact format)


@pytest.mark.parametrize("protocol, bytes_keys", [(2, True), (4, False), (5, True)])
def test_cifar100_format(tmp_path, protocol, bytes_keys):
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    k = (lambda s: s.encode()) if bytes_keys else (lambda s: s)
    rows = {"train": cifar_rows(rng, 6), "test": cifar_rows(rng, 3)}
    fine = {"train": [0, 99, 5, 5, 42, 7], "test": [1, 2, 99]}
    coarse = {"train": [0, 19, 3, 3, 8, 1], "test": [4, 5, 19]}
    for split in ("train", "test"):
        d = {
            k("data"): rows[split],
            k("fine_labels"): fine[split],
            k("coarse_labels"): coarse[split],
        }
        (folder / split).write_bytes(pickle.dumps(d, protocol=protocol))
    meta = {
        k("fine_label_names"): [k(f"f{i}") for i in range(100)],
        k("coarse_label_names"): [k(f"c{i}") for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=protocol))

    ds = data.load_cifar100(tmp_path)
    assert ds.num_classes == 100 and ds.y_train.tolist() == fine["train"]
    assert ds.class_names[99] == "f99"
    # official layout: row = [R plane (32x32), G plane, B plane]; pixel (r, c, ch)
    r, c, ch = 3, 17, 2
    assert ds.x_train[4, r, c, ch] * 255 == pytest.approx(rows["train"][4, ch * 1024 + r * 32 + c])
    np.testing.assert_array_equal(
        np.round(ds.x_test * 255).astype(np.uint8),
        rows["test"].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
    )
    coarse_ds = data.load_cifar100(folder, label="coarse")
    assert coarse_ds.num_classes == 20 and coarse_ds.y_test.tolist() == coarse["test"]
    assert coarse_ds.class_names[19] == "c19"


def test_cifar10_python2_pickles(tmp_path):
    rng = np.random.default_rng(4)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        rows[name] = cifar_rows(rng, 2)
        batch = {b"batch_label": b"batch", b"data": rows[name], b"labels": [i, 9 - i]}
        (folder / name).write_bytes(py2_pickle_dict(batch))
    names = [b"airplane", b"automobile"] + [f"c{i}".encode() for i in range(2, 10)]
    (folder / "batches.meta").write_bytes(py2_pickle_dict({b"label_names": names}))
    assert pickle.loads((folder / "test_batch").read_bytes(), encoding="bytes")[b"labels"] == [5, 4]
    ds = data.load_cifar10(tmp_path)
    assert ds.y_train.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5] and ds.y_test.tolist() == [5, 4]
    assert ds.class_names[:2] == ("airplane", "automobile")
    expected = np.concatenate([rows[f"data_batch_{j}"] for j in range(1, 6)])
    np.testing.assert_array_equal(
        np.round(ds.x_train * 255).astype(np.uint8),
        expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
    )


@pytest.mark.parametrize("sizes", [(3, 1, 4, 1, 5), (1, 4, 5, 3, 2)])
def test_cifar10_batches_of_unequal_sizes_keep_every_image_in_order(tmp_path, sizes):
    """Each batch is written into its rows of one array: smaller or larger later batches
    (not the official release's, but a valid file set) keep every image and label."""
    rng = np.random.default_rng(5)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows = [cifar_rows(rng, n) for n in sizes]
    for j, r in enumerate(rows, start=1):
        labels = [int(v) for v in rng.integers(0, 10, len(r))]
        (folder / f"data_batch_{j}").write_bytes(pickle.dumps({"data": r, "labels": labels}))
    test = cifar_rows(rng, 2)
    (folder / "test_batch").write_bytes(pickle.dumps({"data": test, "labels": [1, 2]}))
    ds = data.load_cifar10(tmp_path)
    expected = np.concatenate(rows)
    assert ds.x_train.shape == (sum(sizes), 32, 32, 3) and len(ds.y_train) == sum(sizes)
    np.testing.assert_array_equal(
        np.round(ds.x_train * 255).astype(np.uint8),
        expected.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
    )
    want = [pickle.loads((folder / f"data_batch_{j}").read_bytes())["labels"] for j in range(1, 6)]
    assert ds.y_train.tolist() == sum(want, [])


class _Evil:
    def __init__(self, marker: Path, fn):
        self.marker, self.fn = marker, fn

    def __reduce__(self):
        if self.fn == "system":
            return (os.system, (f"touch {self.marker}",))
        return (eval, (f"open({str(self.marker)!r}, 'w')",))


@pytest.mark.parametrize(
    "fn, protocol, refused",
    [
        ("system", 2, r"posix\.system|os\.system"),
        ("eval", 2, r"__builtin__\.eval"),
        ("eval", 4, r"builtins\.eval"),
    ],
)
def test_malicious_pickle_refused_without_running(tmp_path, fn, protocol, refused):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    marker = tmp_path / "pwned"
    payload = {b"data": _Evil(marker, fn), b"fine_labels": [0]}
    (folder / "train").write_bytes(pickle.dumps(payload, protocol=protocol))
    (folder / "test").write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(UnsafePickleError, match=refused) as err:
        data.load_cifar100(tmp_path)
    assert str(folder / "train") in str(err.value)
    assert not marker.exists()


def test_pickle_wrong_shape_named(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    bad = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(bad))
    with pytest.raises(ValueError, match=r"data_batch_1.*\[N, 3072\]"):
        data.load_cifar10(tmp_path)


# ---------------------------------------------------------------- miniImageNet (small files)


def test_miniimagenet_full_pickle_layout(tmp_path):
    rng = np.random.default_rng(2)
    n_cls, per = 4, 7
    labels = np.tile(np.arange(n_cls), per)  # interleaved: class c at indices c, c+4, ...
    images = rng.integers(0, 256, (n_cls * per, 84, 84, 3), dtype=np.uint8)
    folder = tmp_path / "miniImageNet_Dataset"
    folder.mkdir()
    with open(folder / "miniImageNet_full.pickle", "wb") as fh:
        pickle.dump({"images": images, "labels": labels}, fh, protocol=2)
    ds = data.load_miniimagenet(tmp_path, train_per_class=5, test_per_class=2)
    assert ds.num_classes == 4 and ds.x_train.shape == (20, 84, 84, 3)
    # per class: the first 5 occurrences in file order are train, the next 2 test
    train_idx = sorted(c + n_cls * j for c in range(n_cls) for j in range(5))
    test_idx = sorted(c + n_cls * j for c in range(n_cls) for j in range(5, 7))
    np.testing.assert_array_equal(np.round(ds.x_train * 255).astype(np.uint8), images[train_idx])
    np.testing.assert_array_equal(ds.y_test, labels[test_idx])
    with pytest.raises(ValueError, match="class 0 has 7 images"):
        data.load_miniimagenet(folder / "miniImageNet_full.pickle")  # default 500 + 100


def test_miniimagenet_cache_layout(tmp_path):
    rng = np.random.default_rng(3)
    classes = {"train": ["n03", "n01"], "val": ["n02"], "test": ["n00"]}
    expected = {}
    for split, names in classes.items():
        imgs = rng.integers(0, 256, (3 * len(names), 84, 84, 3), dtype=np.uint8)
        class_dict = {n: [i, i + len(names), i + 2 * len(names)] for i, n in enumerate(names)}
        for n, idx in class_dict.items():
            expected[n] = imgs[idx]
        d = {"image_data": imgs, "class_dict": class_dict}
        (tmp_path / f"mini-imagenet-cache-{split}.pkl").write_bytes(pickle.dumps(d))
    ds = data.load_miniimagenet(tmp_path, train_per_class=2, test_per_class=1)
    assert ds.class_names == ("n00", "n01", "n02", "n03") and ds.num_classes == 4
    for c, name in enumerate(ds.class_names):
        got = np.round(ds.x_test[ds.y_test == c] * 255).astype(np.uint8)
        np.testing.assert_array_equal(got, expected[name][2:3])


# ---------------------------------------------------------------- npz, digits, dispatch


def test_npz_loader(tmp_path):
    f = tmp_path / "svhn_small.npz"
    x_tr = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    np.savez(f, x_train=x_tr, y_train=np.array([0, 3]), x_test=x_tr[:1], y_test=np.array([2]))
    ds = data.load_dataset(str(f))
    assert ds.name == "svhn_small" and ds.num_classes == 4 and ds.input_shape == (4, 4, 3)
    np.testing.assert_array_equal(ds.x_train, x_tr.astype(np.float32) / 255)
    f2 = tmp_path / "with_k.npz"
    np.savez(
        f2,
        x_train=np.zeros((2, 5)),
        y_train=[0, 1],
        x_test=np.zeros((1, 5)),
        y_test=[1],
        num_classes=7,
        class_names=np.array(list("abcdefg")),
    )
    ds2 = data.load_npz(f2)
    assert ds2.num_classes == 7 and ds2.class_names[6] == "g" and ds2.input_shape == (5,)


def test_npz_missing_key_and_object_arrays(tmp_path):
    f = tmp_path / "bad.npz"
    np.savez(f, x_train=np.zeros((2, 3)), y_train=[0, 1], x_test=np.zeros((1, 3)))
    with pytest.raises(KeyError, match="y_test"):
        data.load_npz(f)
    g = tmp_path / "obj.npz"
    np.savez(
        g,
        x_train=np.array([object()] * 2, dtype=object),
        y_train=[0, 1],
        x_test=np.zeros((1, 3)),
        y_test=[0],
    )
    with pytest.raises(ValueError, match="allow_pickle|object"):
        data.load_npz(g)


def test_digits_split():
    from sklearn.datasets import load_digits

    ds = data.load_digits()
    target = load_digits().target
    assert ds.input_shape == (8, 8, 1) and len(ds.x_train) + len(ds.x_test) == len(target) == 1797
    expected_test = np.round(0.2 * np.bincount(target)).astype(int)
    assert np.bincount(ds.y_test).tolist() == expected_test.tolist()
    assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
    np.testing.assert_array_equal(data.load_digits().y_test, ds.y_test)


def test_load_dataset_env_and_errors(tmp_path, monkeypatch):
    write_idx_set(tmp_path / "mnist", np.full((2, 28, 28), 255), [3, 4], np.zeros((1, 28, 28)), [1])
    monkeypatch.setenv("RGO_DATA_DIR", str(tmp_path))
    ds = data.load_dataset("MNIST")
    assert ds.y_train.tolist() == [3, 4] and ds.x_train.max() == 1.0
    monkeypatch.setenv("RGO_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"nowhere.*RGO_DATA_DIR.*download\('cifar10'"):
        data.load_dataset("cifar10")
    with pytest.raises(ValueError, match=r"unknown data set 'imagenet21k'.*imagenet21k\.npz"):
        data.load_dataset("imagenet21k")
    # any other name is read as <name>.npz from the data folder (e.g. SVHN for 5-datasets)
    (tmp_path / "nowhere" / "svhn").mkdir(parents=True)
    np.savez(
        tmp_path / "nowhere" / "svhn" / "svhn.npz",
        x_train=np.zeros((2, 32, 32, 3), np.uint8),
        y_train=[0, 9],
        x_test=np.zeros((1, 32, 32, 3), np.uint8),
        y_test=[3],
    )
    svhn = data.load_dataset("svhn")
    assert svhn.name == "svhn" and svhn.num_classes == 10 and svhn.input_shape == (32, 32, 3)


# ---------------------------------------------------------------- Dataset record


def _indexed(n_train=200, n_classes=4):
    x = np.arange(n_train, dtype=np.float32).reshape(n_train, 1)  # the row records its index
    y = (np.arange(n_train) % n_classes).astype(np.int32)
    return Dataset("idx", x, y, np.zeros((5, 1), np.float32), np.zeros(5, np.int32), n_classes)


def test_split_validation_from_train_only():
    ds = _indexed()
    val = ds.split_validation(0.1, seed=3)
    held = val.x_test[:, 0].astype(int)
    rest = val.x_train[:, 0].astype(int)
    assert sorted(held.tolist() + rest.tolist()) == list(range(200))  # a partition of TRAIN
    assert np.bincount(val.y_test).tolist() == [5, 5, 5, 5]  # stratified: 10% of 50 per class
    np.testing.assert_array_equal(val.y_test, ds.y_train[held])
    again = ds.split_validation(0.1, seed=3)
    np.testing.assert_array_equal(again.x_test, val.x_test)
    other = ds.split_validation(0.1, seed=4)
    assert not np.array_equal(other.x_test, val.x_test)
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        ds.split_validation(1.0)


def test_dataset_validation():
    x = np.zeros((3, 2), np.float32)
    with pytest.raises(TypeError, match="x_train must be float32"):
        Dataset("d", x.astype(np.float64), np.zeros(3, np.int32), x, np.zeros(3, np.int32), 2)
    with pytest.raises(ValueError, match=r"y_test has labels in \[0, 5\]"):
        Dataset("d", x, np.zeros(3, np.int32), x, np.array([0, 1, 5], np.int32), 2)
    with pytest.raises(ValueError, match=r"y_train must have shape \(3,\)"):
        Dataset("d", x, np.zeros(2, np.int32), x, np.zeros(3, np.int32), 2)
