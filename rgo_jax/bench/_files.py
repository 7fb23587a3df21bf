"""Atomic files: a report can be rewritten after every task, a reader never sees half of one.

Files are written atomically (a temporary file in the same directory, flushed, fsynced,
then ``os.replace``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import stat
import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["to_jsonable", "write_json_atomic", "write_text_atomic"]


def to_jsonable(obj: Any, *, where: str = "obj") -> Any:
    """Converts ``obj`` to plain JSON types: numpy arrays to nested lists, numpy scalars to
    Python numbers, non-finite floats (``nan``, ``inf``) to ``None``.

    JSON has no NaN or Infinity, so they are written as ``null`` (read back as ``None``; turn
    a matrix back into floats with ``np.array(x, dtype=float)``, which maps ``None`` to
    ``nan``). Tuples become lists, paths strings, dataclasses dicts; integer mapping keys are
    turned into strings (as ``json`` does).

    Raises:
      TypeError: naming the path of the first value that has no JSON form.

    Examples:
      >>> import numpy as np
      >>> to_jsonable({"R": np.array([[0.5, np.nan]]), "n": np.int64(3)})
      {'R': [[0.5, None]], 'n': 3}
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if isinstance(k, (bool, np.bool_)) or not isinstance(k, (str, int, np.integer)):
                raise TypeError(f"{where}: dict key {k!r} ({type(k).__name__}) is not a string.")
            out[str(k)] = to_jsonable(v, where=f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v, where=f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return to_jsonable(fields, where=where)
    if isinstance(obj, np.ndarray) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        if arr.dtype.kind not in "biuf":
            if arr.dtype.kind == "O":
                return to_jsonable(arr.tolist(), where=where)
            raise TypeError(f"{where}: array of dtype {arr.dtype} has no JSON form.")
        return to_jsonable(arr.tolist(), where=where)
    raise TypeError(f"{where}: object of type {type(obj).__name__} is not JSON serialisable.")


def _atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` to ``path`` via a fsynced temp file in the same directory + os.replace."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"cannot write {path}: directory {directory} does not exist.")
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable (POSIX); not possible everywhere
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Writes ``text`` to ``path`` atomically: readers see the old file or the new, never part.

    The text goes to a temporary file in the same directory, which is flushed, fsynced and
    then moved over ``path`` with ``os.replace``; on any error the temporary file is removed
    and an existing ``path`` is left untouched. A new file gets mode ``0o644``; a replaced
    file keeps its mode.

    Examples:
      >>> import os, tempfile
      >>> d = tempfile.mkdtemp()
      >>> write_text_atomic(os.path.join(d, "a.txt"), "hello\\n")
      >>> open(os.path.join(d, "a.txt")).read(), os.listdir(d)
      ('hello\\n', ['a.txt'])
    """
    if not isinstance(text, str):
        raise TypeError(
            f"write_text_atomic({os.fspath(path)!r}): text must be str, got {type(text).__name__}."
        )
    _atomic_write_bytes(path, text.encode(encoding))


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Writes ``obj`` as JSON to ``path`` atomically (see :func:`write_text_atomic`).

    The object is converted with :func:`to_jsonable` (numpy arrays to nested lists, numpy
    scalars to numbers, ``nan``/``inf`` to ``null`` since JSON has no NaN) and fully
    serialised in memory before anything touches the disk, so an unserialisable value raises
    ``TypeError`` and leaves an existing file intact.

    Examples:
      >>> import json, os, tempfile, numpy as np
      >>> p = os.path.join(tempfile.mkdtemp(), "r.json")
      >>> write_json_atomic(p, {"R": np.eye(2), "bwt": float("nan")})
      >>> json.load(open(p))
      {'R': [[1.0, 0.0], [0.0, 1.0]], 'bwt': None}
    """
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False, ensure_ascii=False)
    write_text_atomic(path, text + "\n")
