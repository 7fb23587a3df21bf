"""Reader for the IDX format of MNIST-style files (optionally gzip-compressed)."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np

__all__ = ["read_idx"]

# IDX type codes -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


_CHUNK = 1 << 20


def _header(path: Path, head: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """The dtype, shape and header length from the first bytes of an IDX stream."""
    if len(head) < 4:
        raise ValueError(f"{path}: not an IDX file, only {len(head)} bytes (header needs 4).")
    zero0, zero1, code, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{head[:4].hex()} (must start with 0x0000)."
        )
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}.")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions.")
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"the file has {len(head)}."
        )
    shape = struct.unpack(f">{ndim}I", head[4:header_len])
    return _IDX_DTYPES[code], shape, header_len


def _read(path: Path) -> tuple[bytes, np.dtype, tuple[int, ...], int]:
    """The file's (decompressed) bytes, read no further than one byte past the size its
    header declares, so a gzip bomb is not inflated beyond what a valid file holds."""
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        fh = gzip.GzipFile(fileobj=raw) if compressed else raw
        try:
            head = fh.read(4)
            if len(head) == 4:
                head += fh.read(4 * head[3])
            dtype, shape, header_len = _header(path, head)
            expected = math.prod(shape) * dtype.itemsize
            if expected > np.iinfo(np.int64).max:
                dims = "x".join(str(d) for d in shape)
                raise ValueError(
                    f"{path}: IDX header declares {dims} elements of {dtype.name}, "
                    f"{expected} bytes, more than any array can hold (corrupt header)."
                )
            parts, size = [head], 0
            while size <= expected:  # one byte past the declared data: trailing bytes
                block = fh.read(min(_CHUNK, expected + 1 - size))
                if not block:
                    break
                parts.append(block)
                size += len(block)
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise ValueError(f"{path}: corrupt or truncated gzip stream ({e}).") from e
    return b"".join(parts), dtype, shape, header_len


def read_idx(path: str | Path) -> np.ndarray:
    """Reads an IDX file (``.gz`` or raw) into a numpy array of its native type.

    The header is a 4-byte magic number ``00 00 TT DD`` (``TT`` the type code: 0x08 uint8,
    0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64; ``DD`` the number of
    dimensions), then ``DD`` big-endian uint32 sizes, then the data, big-endian, row-major.

    Args:
      path: the file; gzip compression is detected from its first bytes.

    Returns:
      The array, shape from the header, native byte order.

    Raises:
      ValueError: naming the file and the problem (bad magic, unknown type code, truncated
        header or data, trailing bytes, dimensions too large for any array). A gzip file is
        inflated no further than one byte past the size its header declares.

    Examples:
      >>> import os, struct, tempfile
      >>> f = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
      >>> with open(f, "wb") as fh:
      ...     _ = fh.write(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 2, 1]))
      >>> read_idx(f).tolist()
      [7, 2, 1]
    """
    path = Path(path)
    data, dtype, shape, header_len = _read(path)
    expected = math.prod(shape) * dtype.itemsize
    present = len(data) - header_len
    dims = "x".join(str(d) for d in shape)
    if present < expected:
        raise ValueError(
            f"{path}: truncated IDX data: header says {dims} of {dtype.name} "
            f"({expected} bytes) but only {present} bytes are present."
        )
    if present > expected:
        raise ValueError(
            f"{path}: IDX file has unexpected trailing bytes after the {dims} {dtype.name} "
            "data declared in the header."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))
