"""The sample payload format agents upload: one tensor, a tiny fixed header, raw bytes.

Layout (all integers little-endian)::

    magic   4 bytes  b"ELS1"
    dtype   u8       1 = uint8, 2 = float32
    ndim    u8       1..4
    dims    u32 * ndim
    data    prod(dims) * itemsize bytes, C order, little-endian

A sample's id is the SHA-256 (hex) of its payload, so a re-sent sample is recognised by
content; the server recomputes it and refuses a mismatch.
"""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np

MAGIC = b"ELS1"
_CODES: dict[int, np.dtype] = {1: np.dtype("<u1"), 2: np.dtype("<f4")}
_CODE_OF = {np.dtype(np.uint8): 1, np.dtype(np.float32): 2}
MAX_SAMPLE_ELEMENTS = 1 << 24  # 16M elements: far above any edge input, bounds allocations


class SampleFormatError(ValueError):
    """A sample payload is malformed."""


def encode_sample(x: np.ndarray) -> bytes:
    """Serialise one input (uint8 or float32, 1 to 4 dimensions)."""
    arr = np.asarray(x)
    if arr.dtype not in _CODE_OF:
        raise SampleFormatError(f"samples must be uint8 or float32, got {arr.dtype}")
    if not 1 <= arr.ndim <= 4:
        raise SampleFormatError(f"samples must have 1 to 4 dimensions, got shape {arr.shape}")
    if arr.size > MAX_SAMPLE_ELEMENTS:
        raise SampleFormatError(f"sample of {arr.size} elements exceeds {MAX_SAMPLE_ELEMENTS}")
    code = _CODE_OF[arr.dtype]
    header = MAGIC + struct.pack("<BB", code, arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
    return header + np.ascontiguousarray(arr, dtype=_CODES[code]).tobytes()


def decode_sample(payload: bytes) -> np.ndarray:
    """Parse a payload; refuses bad magic, unknown dtypes, and size mismatches."""
    if len(payload) < 6 or payload[:4] != MAGIC:
        raise SampleFormatError("sample payload does not start with b'ELS1'")
    code, ndim = payload[4], payload[5]
    if code not in _CODES:
        raise SampleFormatError(f"unknown sample dtype code {code}")
    if not 1 <= ndim <= 4 or len(payload) < 6 + 4 * ndim:
        raise SampleFormatError(f"bad sample header (ndim={ndim}, {len(payload)} bytes)")
    shape = struct.unpack(f"<{ndim}I", payload[6 : 6 + 4 * ndim])
    count = math.prod(shape)  # Python ints: np.prod wraps at 2**64 (65536**4 would pass as 0)
    if count > MAX_SAMPLE_ELEMENTS:
        raise SampleFormatError(f"sample claims {count} elements (limit {MAX_SAMPLE_ELEMENTS})")
    dtype = _CODES[code]
    body = payload[6 + 4 * ndim :]
    if len(body) != count * dtype.itemsize:
        raise SampleFormatError(f"sample of shape {shape} needs {count * dtype.itemsize} bytes, has {len(body)}")
    arr = np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    if code == 2 and not np.isfinite(arr).all():
        raise SampleFormatError("float sample contains NaN or infinity")
    return arr


def sample_id(payload: bytes) -> str:
    """Content id of a payload (hex SHA-256)."""
    return hashlib.sha256(payload).hexdigest()
