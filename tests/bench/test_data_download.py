"""Verified download against a local HTTP server serving small files written by the test."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rgo_jax.bench import data
from rgo_jax.bench.data import ChecksumError

IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


class _Handler(http.server.SimpleHTTPRequestHandler):
    requests: list[str]

    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        self.requests.append(self.path)
        super().do_GET()


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves ``tmp_path/www`` on 127.0.0.1; yields (folder, base_url, request log)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    www = tmp_path / "www"
    www.mkdir()
    log: list[str] = []
    handler = functools.partial(type("H", (_Handler,), {"requests": log}), directory=str(www))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{httpd.server_address[1]}/", log
    finally:
        httpd.shutdown()
        httpd.server_close()


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _idx(arr: np.ndarray) -> bytes:
    arr = np.asarray(arr, np.uint8)
    head = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return gzip.compress(head + arr.tobytes())


def _write_mnist_files(www: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    payloads = {
        IDX_NAMES[0]: _idx(rng.integers(0, 256, (6, 28, 28))),
        IDX_NAMES[1]: _idx([0, 1, 2, 3, 4, 9]),
        IDX_NAMES[2]: _idx(rng.integers(0, 256, (2, 28, 28))),
        IDX_NAMES[3]: _idx([7, 8]),
    }
    for name, b in payloads.items():
        (www / name).write_bytes(b)
    return {name: _sha(b) for name, b in payloads.items()}


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_download_lands_and_loads(server, tmp_path):
    www, url, log = server
    sums = _write_mnist_files(www)
    cache = tmp_path / "cache"
    out = data.download("mnist", cache, base_url=url, checksums=sums)
    assert out == cache
    assert _leftovers(cache / "mnist") == sorted(IDX_NAMES)
    for name in IDX_NAMES:
        assert data.sha256_file(cache / "mnist" / name) == _sha((www / name).read_bytes())
    ds = data.load_dataset("mnist", cache)
    assert ds.y_train.tolist() == [0, 1, 2, 3, 4, 9] and ds.y_test.tolist() == [7, 8]
    # a second call finds verified files and fetches nothing
    n = len(log)
    data.download("mnist", cache, base_url=url, checksums=sums)
    assert len(log) == n


def test_corrupted_download_raises_and_leaves_nothing(server, tmp_path):
    www, url, _ = server
    sums = _write_mnist_files(www)
    good = sums[IDX_NAMES[2]]
    (www / IDX_NAMES[2]).write_bytes(b"corrupted" + (www / IDX_NAMES[2]).read_bytes()[9:])
    actual = _sha((www / IDX_NAMES[2]).read_bytes())
    cache = tmp_path / "cache"
    with pytest.raises(ChecksumError) as err:
        data.download("mnist", cache, base_url=url, checksums=sums)
    msg = str(err.value)
    assert IDX_NAMES[2] in msg and good in msg and actual in msg
    # the two files before it landed; the bad one (and any temp file) did not
    assert _leftovers(cache / "mnist") == sorted(IDX_NAMES[:2])


def test_builtin_checksum_table_is_used(server, tmp_path):
    www, url, _ = server
    _write_mnist_files(www)  # not the official files, so the official hashes must reject them
    with pytest.raises(ChecksumError, match=data.DOWNLOADS["mnist"].files[IDX_NAMES[0]]):
        data.download("mnist", tmp_path / "c", base_url=url)
    assert _leftovers(tmp_path / "c" / "mnist") == []


def test_official_table_shape():
    for name, src in data.DOWNLOADS.items():
        assert src.urls and all(u.startswith(("https://", "http://")) for u in src.urls), name
        for fname, digest in src.files.items():
            assert len(digest) == 64 and int(digest, 16) >= 0, (name, fname)
    assert set(data.DOWNLOADS) == {"mnist", "fashion_mnist", "cifar10", "cifar100"}


def _tarball(members: dict[str, bytes], extra=None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        if extra is not None:
            tar.addfile(extra)
    return buf.getvalue()


def _cifar10_members() -> dict[str, bytes]:
    rng = np.random.default_rng(5)
    out = {}
    for i in range(1, 6):
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [i, 0]}
        out[f"cifar-10-batches-py/data_batch_{i}"] = pickle.dumps(batch, protocol=2)
    test = {b"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), b"labels": [9, 8, 7]}
    out["cifar-10-batches-py/test_batch"] = pickle.dumps(test, protocol=2)
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)]}
    out["cifar-10-batches-py/batches.meta"] = pickle.dumps(meta, protocol=2)
    return out


def test_cifar10_tarball_extracted(server, tmp_path):
    www, url, _ = server
    blob = _tarball(_cifar10_members())
    (www / "cifar-10-python.tar.gz").write_bytes(blob)
    cache = tmp_path / "cache"
    data.download("cifar10", cache, base_url=url, checksums={"cifar-10-python.tar.gz": _sha(blob)})
    assert _leftovers(cache) == sorted(
        ["cifar-10-batches-py", "batches.meta", "test_batch"]
        + [f"data_batch_{i}" for i in range(1, 6)]
    )  # the archive itself was removed, no temp folders remain
    ds = data.load_cifar10(cache)
    assert ds.y_train.tolist() == [1, 0, 2, 0, 3, 0, 4, 0, 5, 0] and ds.y_test.tolist() == [9, 8, 7]
    assert ds.class_names[9] == "c9"


@pytest.mark.parametrize(
    "bad_name, why",
    [
        ("cifar-10-batches-py/../../escaped.txt", "escapes"),
        ("/tmp/absolute-escape.txt", "absolute"),
        ("elsewhere/file.txt", "outside the folder"),
    ],
)
def test_unsafe_tar_members_refused(server, tmp_path, bad_name, why):
    www, url, _ = server
    members = _cifar10_members()
    members[bad_name] = b"x"
    blob = _tarball(members)
    (www / "cifar-10-python.tar.gz").write_bytes(blob)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=why) as err:
        data.download(
            "cifar10", cache, base_url=url, checksums={"cifar-10-python.tar.gz": _sha(blob)}
        )
    assert bad_name in str(err.value)
    assert _leftovers(cache) == []  # nothing extracted, archive removed
    assert not (tmp_path / "escaped.txt").exists()
    assert not Path("/tmp/absolute-escape.txt").exists()


def test_symlink_member_refused(server, tmp_path):
    www, url, _ = server
    link = tarfile.TarInfo("cifar-10-batches-py/link")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/passwd"
    blob = _tarball(_cifar10_members(), extra=link)
    (www / "cifar-10-python.tar.gz").write_bytes(blob)
    with pytest.raises(ValueError, match="not a regular file"):
        data.download(
            "cifar10",
            tmp_path / "c",
            base_url=url,
            checksums={"cifar-10-python.tar.gz": _sha(blob)},
        )


def test_unreachable_server(tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    with pytest.raises(OSError, match="could not fetch train-images-idx3-ubyte.gz"):
        data.download("mnist", tmp_path, base_url=f"http://127.0.0.1:{port}", timeout=5)
    assert _leftovers(tmp_path / "mnist") == []


def test_checksums_for_unknown_files_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown files \['typo.gz'\]"):
        data.download("mnist", tmp_path, base_url="http://127.0.0.1:9/", checksums={"typo.gz": "0"})


def test_unknown_name():
    with pytest.raises(ValueError, match="no official files known for 'digits'"):
        data.download("digits", "/nonexistent-never-created")


# -- mirrors, truncation, deadlines, size caps, stale temporary files -------------------------


@pytest.fixture
def scripted(monkeypatch):
    """A 127.0.0.1 server whose answer per path is a function of the request handler."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    routes: dict = {}
    hits: list[str] = []

    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def do_GET(self):
            hits.append(self.path)
            answer = routes.get(self.path)
            if answer is None:
                self.send_error(404)
                return
            answer(self)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield routes, f"http://127.0.0.1:{httpd.server_address[1]}", hits
    finally:
        httpd.shutdown()
        httpd.server_close()


def _body(payload: bytes):
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        h.wfile.write(payload)

    return answer


def _truncated_chunked(payload: bytes):
    def answer(h):
        h.send_response(200)
        h.send_header("Transfer-Encoding", "chunked")
        h.send_header("Connection", "close")
        h.end_headers()
        half = payload[: len(payload) // 2]
        h.wfile.write(f"{len(payload):x}\r\n".encode() + half)  # announces more than it sends
        h.wfile.flush()
        h.close_connection = True

    return answer


def _trickle(payload: bytes, pause: float):
    def answer(h):
        h.send_response(200)
        h.send_header("Content-Length", str(len(payload)))
        h.end_headers()
        for i in range(len(payload)):
            try:
                h.wfile.write(payload[i : i + 1])
                h.wfile.flush()
            except OSError:
                return
            time.sleep(pause)

    return answer


def _mnist_routes(routes, prefix, payloads, first=None):
    for name, b in payloads.items():
        routes[f"/{prefix}/{name}"] = (first or _body)(b) if name == IDX_NAMES[0] else _body(b)


def _payloads():
    rng = np.random.default_rng(1)
    return {
        IDX_NAMES[0]: _idx(rng.integers(0, 256, (3, 28, 28))),
        IDX_NAMES[1]: _idx([0, 1, 2]),
        IDX_NAMES[2]: _idx(rng.integers(0, 256, (1, 28, 28))),
        IDX_NAMES[3]: _idx([5]),
    }


def test_a_checksum_error_on_one_mirror_tries_the_next(scripted, tmp_path):
    routes, url, hits = scripted
    payloads = _payloads()
    sums = {k: _sha(v) for k, v in payloads.items()}
    bad = dict(payloads)
    bad[IDX_NAMES[0]] = b"not the file"
    _mnist_routes(routes, "a", bad)
    _mnist_routes(routes, "b", payloads)
    data.download("mnist", tmp_path, base_url=[f"{url}/a", f"{url}/b"], checksums=sums)
    assert f"/a/{IDX_NAMES[0]}" in hits and f"/b/{IDX_NAMES[0]}" in hits
    assert data.sha256_file(tmp_path / "mnist" / IDX_NAMES[0]) == sums[IDX_NAMES[0]]
    # Every mirror wrong: still a ChecksumError, listing each mirror.
    with pytest.raises(ChecksumError, match=f"{url}/a/.*; .*{url}/c/"):
        _mnist_routes(routes, "c", bad)
        data.download("mnist", tmp_path / "x", base_url=[f"{url}/a", f"{url}/c"], checksums=sums)


def test_a_truncated_chunked_response_names_the_url_and_tries_the_next(scripted, tmp_path):
    routes, url, hits = scripted
    payloads = _payloads()
    sums = {k: _sha(v) for k, v in payloads.items()}
    _mnist_routes(routes, "a", payloads, first=_truncated_chunked)
    _mnist_routes(routes, "b", payloads)
    data.download("mnist", tmp_path, base_url=[f"{url}/a", f"{url}/b"], checksums=sums)
    assert f"/b/{IDX_NAMES[0]}" in hits
    assert data.sha256_file(tmp_path / "mnist" / IDX_NAMES[0]) == sums[IDX_NAMES[0]]
    with pytest.raises(OSError, match=f"{url}/a/{IDX_NAMES[0]}: IncompleteRead"):
        data.download("mnist", tmp_path / "x", base_url=f"{url}/a", checksums=sums)
    assert _leftovers(tmp_path / "x" / "mnist") == []


def test_a_trickling_server_is_cut_off_at_the_total_deadline(scripted, tmp_path):
    routes, url, _ = scripted
    payloads = _payloads()
    sums = {k: _sha(v) for k, v in payloads.items()}
    _mnist_routes(routes, "a", payloads, first=lambda b: _trickle(b, 0.05))
    t0 = time.monotonic()
    with pytest.raises(OSError, match="deadline"):
        data.download("mnist", tmp_path, base_url=f"{url}/a", checksums=sums, total_timeout=0.5)
    assert time.monotonic() - t0 < 5  # the body would take minutes
    assert _leftovers(tmp_path / "mnist") == []


def test_a_server_trickling_its_headers_is_cut_off_at_the_total_deadline(scripted, tmp_path):
    routes, url, _ = scripted
    payloads = _payloads()
    sums = {k: _sha(v) for k, v in payloads.items()}

    def slow_headers(h):
        for c in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 10_000:
            try:
                h.wfile.write(bytes([c]))
                h.wfile.flush()
            except OSError:
                return
            time.sleep(0.05)

    _mnist_routes(routes, "a", payloads, first=lambda b: slow_headers)
    t0 = time.monotonic()
    with pytest.raises(OSError, match="deadline"):
        data.download("mnist", tmp_path, base_url=f"{url}/a", checksums=sums, total_timeout=0.5)
    assert time.monotonic() - t0 < 5
    assert _leftovers(tmp_path / "mnist") == []


def test_a_response_over_the_size_cap_is_refused(scripted, tmp_path):
    routes, url, _ = scripted
    payloads = _payloads()
    sums = {k: _sha(v) for k, v in payloads.items()}
    huge = b"\0" * 200_000

    def no_length(h):  # no Content-Length: the cap must hold while streaming
        h.send_response(200)
        h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(huge)
        h.close_connection = True

    _mnist_routes(routes, "a", payloads, first=lambda b: no_length)
    _mnist_routes(routes, "b", payloads, first=lambda b: _body(huge))
    for base, why in (("a", "exceeds the size cap of 50000"), ("b", "announces 200000 bytes")):
        with pytest.raises(OSError, match=why):
            data.download(
                "mnist", tmp_path, base_url=f"{url}/{base}", checksums=sums, max_bytes=50_000
            )
        assert _leftovers(tmp_path / "mnist") == []
    assert data.DOWNLOADS["mnist"].max_bytes < 300 << 20


def test_stale_part_files_of_killed_downloads_are_removed(server, tmp_path):
    www, url, _ = server
    sums = _write_mnist_files(www)
    folder = tmp_path / "mnist"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = [
        folder / f".{IDX_NAMES[0]}.{dead.pid}.x1y2.part",  # its process is gone
        folder / f".{IDX_NAMES[1]}.k3j_9z0a.part",  # older naming, without a pid
    ]
    alive = folder / f".{IDX_NAMES[2]}.{os.getppid()}.abcd.part"  # a running process's
    for p in (*stale, alive):
        p.write_bytes(b"partial")
    data.download("mnist", tmp_path, base_url=url, checksums=sums)
    assert not any(p.exists() for p in stale) and alive.exists()
    assert _leftovers(folder) == sorted([*IDX_NAMES, alive.name])


def test_a_truncated_tarball_names_the_file(server, tmp_path):
    www, url, _ = server
    blob = _tarball(_cifar10_members())[:-200]  # cut inside the gzip stream
    (www / "cifar-10-python.tar.gz").write_bytes(blob)
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"cifar-10-python.tar.gz: truncated or corrupt tarball"):
        data.download(
            "cifar10", cache, base_url=url, checksums={"cifar-10-python.tar.gz": _sha(blob)}
        )
    assert _leftovers(cache) == []
