"""Reader for the IDX format of MNIST-style files (optionally gzip-compressed)."""

from __future__ import annotations

import gzip
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


def _read_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as e:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({e}).") from e


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
        header or data, trailing bytes).

    Examples:
      >>> import os, struct, tempfile
      >>> f = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte")
      >>> with open(f, "wb") as fh:
      ...     _ = fh.write(struct.pack(">BBBBI", 0, 0, 8, 1, 3) + bytes([7, 2, 1]))
      >>> read_idx(f).tolist()
      [7, 2, 1]
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: not an IDX file, only {len(data)} bytes (header needs 4).")
    zero0, zero1, code, ndim = data[0], data[1], data[2], data[3]
    if zero0 != 0 or zero1 != 0:
        raise ValueError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()} (must start with 0x0000)."
        )
    if code not in _IDX_DTYPES:
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02x}.")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions.")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"the file has {len(data)}."
        )
    shape = struct.unpack(f">{ndim}I", data[4:header_len])
    dtype = _IDX_DTYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    present = len(data) - header_len
    dims = "x".join(str(d) for d in shape)
    if present < expected:
        raise ValueError(
            f"{path}: truncated IDX data: header says {dims} of {dtype.name} "
            f"({expected} bytes) but only {present} bytes are present."
        )
    if present > expected:
        raise ValueError(
            f"{path}: IDX file has {present - expected} unexpected trailing bytes after "
            f"the {dims} {dtype.name} data declared in the header."
        )
    arr = np.frombuffer(data, dtype=dtype, offset=header_len).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))
