"""The IDX file format of (Fashion-)MNIST: `read_idx` and its `IdxFormatError`."""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np

__all__ = ["IdxFormatError", "read_idx"]


class IdxFormatError(ValueError):
    """An IDX file is truncated, corrupt or not the file it was expected to be."""


# IDX type codes -> big-endian numpy dtypes (http://yann.lecun.com/exdb/mnist/, "file format").
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Reads an IDX file (optionally gzip-compressed) into a numpy array.

    Args:
      path: an IDX file; read through gzip when its name ends in ``.gz``.

    Returns:
      An array of the dimensions and dtype (native byte order) the header declares, e.g.
      uint8 ``[60000, 28, 28]`` for ``train-images-idx3-ubyte.gz``.

    Raises:
      IdxFormatError: the file is not valid gzip, is truncated, has a bad magic number, or
        holds a different number of bytes than its header declares.
    """
    path = os.fspath(path)
    try:
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            with open(path, "rb") as f:
                raw = f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        # EOFError is what gzip raises on a file cut short mid-stream.
        raise IdxFormatError(
            f"{path}: corrupt or truncated gzip data ({type(e).__name__}: {e})"
        ) from e
    if len(raw) < 4:
        raise IdxFormatError(f"{path}: {len(raw)} bytes, too short for an IDX header")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code not in _IDX_DTYPES or ndim == 0:
        raise IdxFormatError(f"{path}: bad IDX magic number 0x{raw[:4].hex()}")
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise IdxFormatError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    dtype = _IDX_DTYPES[type_code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise IdxFormatError(
            f"{path}: header declares shape {shape} ({expected} data bytes) but the file holds "
            f"{len(raw) - header_size} data bytes; it is truncated or corrupt"
        )
    data = np.frombuffer(raw, dtype=dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="), copy=False)
