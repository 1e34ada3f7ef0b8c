"""The IDX format of MNIST-like data sets: header, element type and size checked before use."""

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from dgm.errors import DgmError

__all__ = ["read_bytes", "read_idx"]

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_MAX_BYTES = 1 << 30  # no IDX data set here is near 1 GiB; refuse gzip bombs and absurd headers


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip) into a read-only array, checking its header and size."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DgmError(f"cannot read {path}: {e.strerror}") from None
    return _read_idx(str(path), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=16)
def _read_idx(path: str, mtime_ns: int, size: int) -> np.ndarray:  # stat keys the cache
    raw = read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DgmError(f"{path} is not an IDX file (bad magic number); "
                       "delete it and fetch it again")
    ndim = raw[3]
    if ndim == 0 or len(raw) < 4 + 4 * ndim:
        raise DgmError(f"{path} is a truncated IDX file (incomplete header); fetch it again")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = int(np.prod(shape, dtype=object)) * dtype.itemsize
    body = len(raw) - 4 - 4 * ndim
    if expected != body:
        raise DgmError(f"{path} is corrupt: its header declares {shape} ({expected} bytes) "
                       f"but it holds {body} bytes; delete it and fetch it again")
    array = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim).reshape(shape)
    return array


def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            stream = gzip.GzipFile(fileobj=f) if head == b"\x1f\x8b" else f
            raw = stream.read(_MAX_BYTES + 1)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise DgmError(f"cannot read {path}: {e}; delete it and fetch it again") from None
    if len(raw) > _MAX_BYTES:
        raise DgmError(f"{path} decompresses to over 1 GiB, which no IDX data set here does")
    return raw
