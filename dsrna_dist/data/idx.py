"""Reader for the IDX format of (Fashion-)MNIST, gzipped or not, validating every header field.

Format (LeCun): 2 zero bytes, a type byte (0x08 = unsigned byte), the number of dimensions,
then one big-endian uint32 per dimension, then the data in C order. A truncated download or a
wrong file must fail here with the file name, never later as a shape error.
"""
from __future__ import annotations

import gzip
import os
import struct
import zlib
from typing import Optional, Sequence

import numpy as np

from .errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"


def read_bytes(path: str) -> bytes:
    """File contents, gunzipped when the file is gzip (by content, not by name)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: corrupt or truncated gzip data ({e})") from None
    return raw


def parse_idx(data: bytes, path: str, ndim: int, dims: Optional[Sequence[Optional[int]]] = None) -> np.ndarray:
    """Parse IDX bytes into a uint8 array of ``ndim`` dims; ``dims`` entries (or None) are checked."""
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header")
    zero, dtype, nd = struct.unpack(">HBB", data[:4])
    if zero != 0:
        raise DataError(f"{path}: bad IDX magic number 0x{data[:4].hex()} (not an IDX file)")
    if dtype != 0x08:
        raise DataError(f"{path}: IDX data type 0x{dtype:02x}, expected 0x08 (unsigned byte)")
    if nd != ndim:
        raise DataError(f"{path}: IDX file has {nd} dimensions, expected {ndim}")
    header = 4 + 4 * nd
    if len(data) < header:
        raise DataError(f"{path}: truncated IDX header ({len(data)} bytes, need {header})")
    shape = struct.unpack(">" + "I" * nd, data[4:header])
    if dims is not None:
        for i, (got, want) in enumerate(zip(shape, dims)):
            if want is not None and got != want:
                raise DataError(f"{path}: IDX dimension {i} is {got}, expected {want}")
    need = int(np.prod(shape, dtype=np.int64))
    have = len(data) - header
    if have < need:
        raise DataError(f"{path}: truncated: header says {'x'.join(map(str, shape))} = {need} bytes "
                        f"of data, file has {have}")
    if have > need:
        raise DataError(f"{path}: {have - need} unexpected trailing bytes after the IDX data")
    return np.frombuffer(data, dtype=np.uint8, count=need, offset=header).reshape(shape)


def read_idx(path: str, ndim: int, dims: Optional[Sequence[Optional[int]]] = None) -> np.ndarray:
    return parse_idx(read_bytes(path), path, ndim, dims)


def find_file(dirs: Sequence[str], stem: str) -> Optional[str]:
    """``stem`` or ``stem.gz`` in the first directory holding either."""
    for d in dirs:
        for name in (stem + ".gz", stem):
            p = os.path.join(d, name)
            if d and os.path.isfile(p):
                return p
    return None
