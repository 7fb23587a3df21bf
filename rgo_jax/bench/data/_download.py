"""Opt-in download of the official data set files, verified by SHA-256.

Nothing in the package downloads on its own: :func:`download` is only called explicitly.
Files are fetched with ``urllib``, hashed while streaming to a temporary file in the target
folder, and moved into place with ``os.replace`` only when the SHA-256 matches the table
below, so an interrupted or corrupted download never leaves a file under the final name.
Tarballs are extracted with every member checked (no absolute paths, no ``..``, no links
or devices).

Checksums (SHA-256 of the official files) — each value agrees across several independent
published sources (e.g. the torchvision and Keras data set code):

- ``mnist``: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, originally from
  yann.lecun.com/exdb/mnist (tried last: that site often refuses downloads; two long-lived
  mirrors of the same files are tried first).
- ``fashion_mnist``: the same file names, from Zalando Research's S3 bucket or GitHub.
- ``cifar10`` / ``cifar100``: ``cifar-{10,100}-python.tar.gz`` from www.cs.toronto.edu/~kriz.

The URLs and hashes are in :data:`DOWNLOADS`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import socket
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from rgo_jax.bench.data._loaders import canonical_name, default_data_dir

__all__ = ["ChecksumError", "DOWNLOADS", "download", "sha256_file"]


class ChecksumError(ValueError):
    """A downloaded file's SHA-256 does not match the expected value."""


@dataclass(frozen=True)
class _Source:
    """Where a data set's files come from and what they must hash to."""

    urls: tuple[str, ...]  # base URLs, tried in order (each ends with "/")
    files: Mapping[str, str]  # file name -> SHA-256 (hex)
    subdir: str  # folder under cache_dir that receives the files ("" for tarballs)
    archive: bool  # files are tarballs to extract into cache_dir
    extracted: str = ""  # for tarballs: the folder the archive unpacks to
    marker: str = ""  # for tarballs: a file inside ``extracted`` proving a finished extraction
    max_bytes: int = 64 << 20  # a response larger than this is cut off and refused


_IDX_NAMES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)

DOWNLOADS: Mapping[str, _Source] = {
    "mnist": _Source(
        urls=(
            "https://ossci-datasets.s3.amazonaws.com/mnist/",  # mirror of the official files
            "https://storage.googleapis.com/cvdf-datasets/mnist/",  # mirror
            "http://yann.lecun.com/exdb/mnist/",  # the original site
        ),
        files=dict(
            zip(
                _IDX_NAMES,
                (
                    "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                    "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                    "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                    "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                ),
                strict=True,
            )
        ),
        subdir="mnist",
        archive=False,
        max_bytes=32 << 20,  # the largest file is 9.9 MB
    ),
    "fashion_mnist": _Source(
        urls=(
            "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
            "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        ),
        files=dict(
            zip(
                _IDX_NAMES,
                (
                    "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                    "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                    "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                    "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                ),
                strict=True,
            )
        ),
        subdir="fashion-mnist",
        archive=False,
        max_bytes=64 << 20,  # the largest file is 26 MB
    ),
    "cifar10": _Source(
        urls=("https://www.cs.toronto.edu/~kriz/",),
        files={
            "cifar-10-python.tar.gz": (
                "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
            )
        },
        subdir="",
        archive=True,
        extracted="cifar-10-batches-py",
        marker="test_batch",
        max_bytes=256 << 20,  # 163 MiB
    ),
    "cifar100": _Source(
        urls=("https://www.cs.toronto.edu/~kriz/",),
        files={
            "cifar-100-python.tar.gz": (
                "85cd44d02ba6437773c5bbd22e183051d648de2e7d6b014e1ef29b855ba677a7"
            )
        },
        subdir="",
        archive=True,
        extracted="cifar-100-python",
        marker="test",
        max_bytes=256 << 20,  # 161 MiB
    ),
}


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _TooSlow(OSError):
    """The download did not finish within its total deadline."""


def _part_prefix(dest: Path) -> str:
    return f".{dest.name}."


def _clean_stale_parts(dest: Path) -> None:
    """Removes ``.part`` files of ``dest`` left by downloads that were killed.

    A temporary file is named ``.<name>.<pid>.<random>.part``; one whose process no longer
    runs (or of an older naming without the pid) is stale.
    """
    if not dest.parent.is_dir():
        return
    for part in dest.parent.glob(_part_prefix(dest) + "*.part"):
        pid_text = part.name[len(_part_prefix(dest)) :].split(".", 1)[0]
        if pid_text.isdigit() and int(pid_text) != os.getpid():
            try:
                os.kill(int(pid_text), 0)
                continue  # its process still runs
            except ProcessLookupError:
                pass
            except PermissionError:
                continue  # another user's running process
        elif pid_text.isdigit():
            continue  # this process's own (a concurrent thread)
        part.unlink(missing_ok=True)


class _Watchdog:
    """Shuts the connections of one download down when its deadline passes, so that a
    server trickling its headers (or body) cannot keep a read waiting past it."""

    def __init__(self, deadline: float):
        self.sockets: list[socket.socket] = []
        self.fired = False
        self._timer = threading.Timer(max(deadline - time.monotonic(), 0.0), self._fire)
        self._timer.daemon = True

    def _fire(self) -> None:
        self.fired = True
        for sock in self.sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def opener(self) -> urllib.request.OpenerDirector:
        """An opener (proxies and redirects as usual) whose connections the watchdog sees."""
        watchdog = self

        def watched(base):
            class Connection(base):
                def connect(self):
                    super().connect()
                    watchdog.sockets.append(self.sock)

            return Connection

        http_conn = watched(http.client.HTTPConnection)
        https_conn = watched(http.client.HTTPSConnection)

        class HTTP(urllib.request.HTTPHandler):
            def http_open(self, req):
                return self.do_open(http_conn, req)

        class HTTPS(urllib.request.HTTPSHandler):
            def https_open(self, req):
                return self.do_open(https_conn, req, context=self._context)

        return urllib.request.build_opener(HTTP, HTTPS)

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc) -> None:
        self._timer.cancel()


def _fetch(
    url: str, dest: Path, expected: str, timeout: float, deadline: float, max_bytes: int
) -> None:
    """Streams ``url`` into a temp file beside ``dest``, checks SHA-256, then renames.

    ``timeout`` bounds each network operation; ``deadline`` (a ``time.monotonic()`` value)
    the whole download, headers included (a watchdog shuts the connection down when it
    passes); more than ``max_bytes`` is refused.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f"{_part_prefix(dest)}{os.getpid()}.", suffix=".part", dir=dest.parent
    )
    tmp = Path(tmp_name)
    try:
        with _Watchdog(deadline) as watchdog:
            try:
                _stream(watchdog.opener(), url, fd, timeout, deadline, max_bytes, expected, dest)
            except (OSError, http.client.HTTPException, ValueError):
                if watchdog.fired:
                    raise _TooSlow("not finished within the deadline") from None
                raise
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()


def _stream(opener, url, fd, timeout, deadline, max_bytes, expected, dest) -> None:
    """Writes the body of ``url`` to ``fd`` within the deadline and the size cap, and
    checks its SHA-256."""
    digest = hashlib.sha256()
    size = 0
    with os.fdopen(fd, "wb") as out, opener.open(url, timeout=timeout) as resp:
        declared = resp.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > max_bytes:
            raise OSError(f"the server announces {declared} bytes, over the cap {max_bytes}")
        while True:
            if time.monotonic() > deadline:
                raise _TooSlow(f"not finished within the deadline ({size} bytes so far)")
            block = resp.read1(1 << 20)  # returns what has arrived: the deadline is seen
            if not block:
                break
            size += len(block)
            if size > max_bytes:
                raise OSError(f"the response exceeds the size cap of {max_bytes} bytes")
            digest.update(block)
            out.write(block)
    actual = digest.hexdigest()
    if actual != expected.lower():
        raise ChecksumError(
            f"{dest.name}: SHA-256 mismatch for {url}: expected {expected.lower()}, "
            f"got {actual}. The file was discarded."
        )


def _check_member(member: tarfile.TarInfo, archive: Path, top: str) -> None:
    name = member.name
    parts = PurePosixPath(name).parts
    if (
        name.startswith(("/", "\\"))
        or PurePosixPath(name).is_absolute()
        or (len(name) > 1 and name[1] == ":")
    ):
        raise ValueError(f"{archive}: refusing member with an absolute path: {name!r}.")
    if ".." in parts or "\\" in name:
        raise ValueError(f"{archive}: refusing member that escapes the folder: {name!r}.")
    if top and (not parts or parts[0] != top):
        raise ValueError(f"{archive}: refusing member {name!r} outside the folder {top!r}.")
    if not (member.isfile() or member.isdir()):
        raise ValueError(
            f"{archive}: refusing member {name!r} that is not a regular file or folder "
            "(links and devices are not extracted)."
        )


def _extract(archive: Path, cache_dir: Path, top: str) -> None:
    """Safely extracts ``archive`` (all members under ``top/``) into ``cache_dir``."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            _extract_members(tar, archive, cache_dir, top)
    except (tarfile.ReadError, EOFError, zlib.error) as e:
        raise ValueError(
            f"{archive}: truncated or corrupt tarball ({e}); nothing extracted."
        ) from e


def _extract_members(tar: tarfile.TarFile, archive: Path, cache_dir: Path, top: str) -> None:
    members = tar.getmembers()
    for m in members:
        _check_member(m, archive, top)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=cache_dir))
    try:
        if hasattr(tarfile, "data_filter"):
            tar.extractall(tmp, members=members, filter="data")
        else:  # pragma: no cover - Python < 3.11.4; members were checked above
            tar.extractall(tmp, members=members)
        for top in sorted(p for p in tmp.iterdir()):
            target = cache_dir / top.name
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            os.replace(top, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def download(
    name: str,
    cache_dir: str | Path | None = None,
    *,
    base_url: str | Sequence[str] | None = None,
    checksums: Mapping[str, str] | None = None,
    timeout: float = 60.0,
    total_timeout: float = 1800.0,
    max_bytes: int | None = None,
    keep_archive: bool = False,
) -> Path:
    """Downloads a data set's official files into ``cache_dir`` and verifies them.

    Supported: ``mnist``, ``fashion_mnist`` (IDX ``.gz`` files into ``cache_dir/mnist`` /
    ``cache_dir/fashion-mnist``), ``cifar10``, ``cifar100`` (tarballs extracted to
    ``cache_dir/cifar-10-batches-py`` / ``cache_dir/cifar-100-python``). Files already present
    with the right hash are not fetched again. Afterwards ``load_dataset(name, cache_dir)``
    finds the data.

    Args:
      name: data set name.
      cache_dir: target folder; default ``$RGO_DATA_DIR`` or ``~/.cache/rgo_jax``.
      base_url: a base URL (or several, tried in order) replacing the official ones; the
        file names are appended to it.
      checksums: file name -> SHA-256 overriding the built-in table (for mirrors or tests).
      timeout: seconds per network operation.
      total_timeout: seconds one file's download may take in all, from one URL (a server
        that trickles bytes is cut off); then the next URL is tried.
      max_bytes: size cap of one file (default: a few times the largest official file of
        the data set); a larger response is cut off and the next URL tried.
      keep_archive: keep the downloaded tarball after extraction.

    Returns:
      ``cache_dir``, to pass as ``data_dir`` to :func:`load_dataset`.

    Raises:
      ChecksumError: every URL failed and at least one served a file with another SHA-256
        (the message names the file, the expected and actual hashes, and every URL's
        error); no file is left behind.
      OSError: no URL could be fetched (the message lists each URL's error: unreachable,
        truncated, too slow or too large).

    Each URL is tried in turn until one gives the file with the right hash. Temporary
    ``.part`` files left by a killed download are removed first.
    """
    key = canonical_name(name)
    if key not in DOWNLOADS:
        raise ValueError(
            f"download: no official files known for {name!r}; supported: {', '.join(DOWNLOADS)}."
        )
    src = DOWNLOADS[key]
    files = dict(src.files)
    if checksums is not None:
        unknown = sorted(set(checksums) - set(files))
        if unknown:
            raise ValueError(
                f"download {key}: checksums given for unknown files {unknown}; "
                f"the files are {sorted(files)}."
            )
        files.update(checksums)
    urls = (base_url,) if isinstance(base_url, str) else tuple(base_url or src.urls)
    urls = tuple(u if u.endswith("/") else u + "/" for u in urls)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_data_dir()
    cache.mkdir(parents=True, exist_ok=True)
    folder = cache / src.subdir if src.subdir else cache
    for fname, expected in files.items():
        dest = folder / fname
        if src.archive and (cache / src.extracted / src.marker).is_file() and not dest.exists():
            continue  # already extracted
        if not (dest.is_file() and sha256_file(dest) == expected.lower()):
            _clean_stale_parts(dest)
            errors: list[str] = []
            bad_hash = False
            for base in urls:
                try:
                    _fetch(
                        base + fname,
                        dest,
                        expected,
                        timeout,
                        time.monotonic() + total_timeout,
                        src.max_bytes if max_bytes is None else max_bytes,
                    )
                    break
                except ChecksumError as e:
                    bad_hash = True
                    errors.append(str(e))
                except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
                    errors.append(f"{base + fname}: {type(e).__name__}: {e}")
            else:
                msg = f"download {key}: could not fetch {fname}: " + "; ".join(errors)
                raise ChecksumError(msg) if bad_hash else OSError(msg)
        if src.archive:
            try:
                _extract(dest, cache, src.extracted)
            finally:
                if not keep_archive:
                    dest.unlink()
    return cache
