"""KServe v2 tensors as raw bytes: the HTTP binary data extension's and gRPC's raw contents.

A fixed-size type is its values, little-endian, row-major; ``BYTES`` is each
element as a 4-byte little-endian length and then its bytes. An answer's
failed rows have no values: they are sent as NaN (floats), 0 (integers),
false or empty bytes, and the ``error`` output says which rows failed.
"""
from __future__ import annotations

import struct

import numpy as np

DTYPES = {"BOOL": np.bool_, "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
          "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
          "FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
_LENGTH = struct.Struct("<I")


class RawError(ValueError):
    """Raw contents that do not hold what their tensor says."""


def _fill(datatype: str):
    return np.nan if datatype.startswith("FP") else False if datatype == "BOOL" else 0


def to_raw(datatype: str, flat: list) -> bytes:
    """A tensor's values (row-major, ``None`` for a failed row's) as raw contents."""
    if datatype == "BYTES":
        parts = []
        for v in flat:
            b = b"" if v is None else v.encode() if isinstance(v, str) else bytes(v)
            parts += (_LENGTH.pack(len(b)), b)
        return b"".join(parts)
    fill = _fill(datatype)
    return np.asarray([fill if v is None else v for v in flat], DTYPES[datatype]).astype(
        np.dtype(DTYPES[datatype]).newbyteorder("<"), copy=False).tobytes()


def bytes_elements(raw: bytes | memoryview, where: str) -> list[bytes]:
    """The elements of a ``BYTES`` tensor's raw contents."""
    raw = memoryview(raw)
    out, at = [], 0
    while at < len(raw):
        if at + 4 > len(raw):
            raise RawError(f"{where}: the raw BYTES contents end inside an element's 4-byte length")
        (n,) = _LENGTH.unpack_from(raw, at)
        at += 4
        if at + n > len(raw):
            raise RawError(f"{where}: an element says {n} bytes, but only {len(raw) - at} are left")
        out.append(bytes(raw[at:at + n]))
        at += n
    return out


__all__ = ["DTYPES", "RawError", "bytes_elements", "to_raw"]
