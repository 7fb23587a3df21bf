"""A restricted unpickler: numpy arrays and plain containers only, nothing executable."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "load_pickle"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for a global outside the allowed set (numpy arrays, plain containers)."""


def _latin1_encode(obj: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol <= 2 pickles written by Python 3 store bytes as _codecs.encode(str, "latin1").
    if encoding.lower().replace("_", "-") not in ("latin1", "latin-1", "iso-8859-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return codecs.encode(obj, encoding, errors)


def _numpy_core() -> dict[tuple[str, str], Any]:
    from numpy._core import multiarray, numeric

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
        # numpy pickles an array as ``_reconstruct(ndarray, (0,), b"b")`` and then sets its
        # state from the data; a larger shape here is an allocation the data does not back.
        if np.prod(np.asarray(shape, dtype=object)) not in (0, 1):
            raise UnsafePickleError(
                f"numpy _reconstruct asked to allocate shape {shape} (an allocation, not data)"
            )
        return multiarray._reconstruct(subtype, shape, dtype)

    return {
        ("multiarray", "_reconstruct"): reconstruct,
        ("multiarray", "scalar"): multiarray.scalar,
        ("numeric", "_frombuffer"): numeric._frombuffer,
    }


def _bytearray(*args: Any) -> bytearray:
    # ``bytearray(n)`` allocates n zero bytes from a few bytes of pickle: only the forms
    # pickle itself writes (from bytes, or from a latin-1 str) are allowed.
    if not args or isinstance(args[0], (bytes, str)):
        return bytearray(*args)
    raise UnsafePickleError(
        f"builtins.bytearray called with a {type(args[0]).__name__} (an allocation, not data)"
    )


_CONTAINERS = {
    "dict": dict,
    "list": list,
    "tuple": tuple,
    "set": set,
    "frozenset": frozenset,
    "bytearray": _bytearray,
    "complex": complex,
}


def _allowed(module: str, name: str) -> Any | None:
    """The object for an allowed ``module.name`` global, or None if it is refused."""
    if module == "numpy" and name == "ndarray":
        return np.ndarray
    if module == "numpy" and name == "dtype":
        return np.dtype
    for prefix in ("numpy.core.", "numpy._core."):
        if module.startswith(prefix):
            return _numpy_core().get((module[len(prefix) :], name))
    if module in ("builtins", "__builtin__") and name in _CONTAINERS:
        return _CONTAINERS[name]
    if module == "collections" and name == "OrderedDict":
        import collections

        return collections.OrderedDict
    if module == "_codecs" and name == "encode":
        return _latin1_encode
    return None


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        obj = _allowed(module, name)
        if obj is None:
            raise UnsafePickleError(f"refused global {module}.{name}")
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refused persistent id")


def load_pickle(path: str | Path) -> Any:
    """Loads a pickle that may only contain numpy arrays, numpy scalars and plain containers.

    Any other global (``os.system``, ``builtins.eval``, arbitrary classes) is refused
    *before* it is called, so a malicious file cannot execute code. Python 2 pickles (the
    official CIFAR releases) are read with ``encoding="latin1"``, which restores numpy
    arrays correctly; their ``str`` keys come back as ``str``, Python 3 ``bytes`` keys stay
    ``bytes`` (callers normalise keys).

    Args:
      path: the pickle file.

    Returns:
      The unpickled object.

    Raises:
      UnsafePickleError: naming the file and the refused global (or a ``bytearray(n)``
        allocation, which a pickle of data never needs).
      MemoryError: naming the file, when it needs more memory than there is.
      ValueError: if the file is truncated or not a pickle.

    Examples:
      >>> import os, pickle, tempfile, numpy as np
      >>> d = tempfile.mkdtemp()
      >>> f = os.path.join(d, "ok.pkl")
      >>> with open(f, "wb") as fh:
      ...     pickle.dump({"x": np.arange(3)}, fh)
      >>> load_pickle(f)["x"].tolist()
      [0, 1, 2]
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, encoding="latin1").load()
    except UnsafePickleError as e:
        raise UnsafePickleError(
            f"{path}: unsafe pickle, {e}. Only numpy arrays and plain containers are "
            "allowed; the file was not loaded."
        ) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: not a readable pickle ({type(e).__name__}: {e}).") from e
    except MemoryError:
        raise MemoryError(
            f"{path}: out of memory while unpickling ({path.stat().st_size} bytes on disk); "
            "the file asks for more memory than this machine has."
        ) from None


def normalize_keys(obj: Any, path: str | Path) -> dict[str, Any]:
    """Returns a dict with ``str`` keys from a dict with ``bytes`` or ``str`` keys."""
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a pickled dict, got {type(obj).__name__}.")
    out = {}
    for k, v in obj.items():
        key = k.decode("latin1") if isinstance(k, bytes) else str(k)
        out[key] = v
    return out
