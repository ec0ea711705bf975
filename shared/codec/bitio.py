"""Byte and bit plumbing for the diff wire format: LEB128 varints, a bounds-checked reader,
and MSB-first bit arrays (``numpy.packbits`` order)."""

from __future__ import annotations

import struct

import numpy as np

from shared.codec.errors import DiffError, LimitError, TruncatedDiffError

MAX_VARINT_BYTES = 9  # 63 bits: every size in the format fits, and int64 arithmetic is safe


def write_varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, least significant group first, high bit = more."""
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"varint out of range: {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


class ByteReader:
    """Sequential reader over ``data[start:end]`` that raises instead of reading past the end.

    ``what`` names the region in error messages (e.g. "tensor table").
    """

    def __init__(self, data: bytes | memoryview, start: int, end: int, what: str) -> None:
        self.data = memoryview(data)
        self.pos = start
        self.end = end
        self.what = what

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, field: str) -> memoryview:
        if n < 0 or n > self.remaining():
            raise TruncatedDiffError(
                f"{self.what}: {field} needs {n} bytes at offset {self.pos}, "
                f"only {self.remaining()} left"
            )
        view = self.data[self.pos : self.pos + n]
        self.pos += n
        return view

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def f32(self, field: str) -> np.float32:
        return np.float32(struct.unpack("<f", self.take(4, field))[0])

    def varint(self, field: str, limit: int) -> int:
        """A canonical (shortest-form) varint no larger than ``limit``."""
        value = shift = 0
        for i in range(MAX_VARINT_BYTES):
            byte = self.u8(field)
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                if byte == 0 and i > 0:
                    raise DiffError(f"{self.what}: {field} is a non-canonical (overlong) varint")
                if value > limit:
                    raise LimitError(f"{self.what}: {field} = {value} exceeds the limit {limit}")
                return value
        raise LimitError(f"{self.what}: {field} varint longer than {MAX_VARINT_BYTES} bytes")


def pack_bits(bits: np.ndarray) -> bytes:
    """0/1 uint8 array -> bytes, MSB first, zero-padded to a whole byte."""
    return np.packbits(bits.astype(np.uint8, copy=False)).tobytes()


def unpack_bits(data: bytes | memoryview) -> np.ndarray:
    """bytes -> 0/1 uint8 array of 8 * len(data) bits, MSB first."""
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


def bits_to_uint(bits: np.ndarray, width: int) -> np.ndarray:
    """Read ``len(bits) // width`` unsigned MSB-first fields of ``width`` bits (width <= 62)."""
    if not 1 <= width <= 62:
        raise ValueError(f"field width must lie in [1, 62], got {width}")
    fields = bits.reshape(-1, width).astype(np.int64)
    weights = np.left_shift(np.int64(1), np.arange(width - 1, -1, -1, dtype=np.int64))
    return fields @ weights


def uint_to_bits(values: np.ndarray, width: int) -> np.ndarray:
    """Inverse of :func:`bits_to_uint`: each value as ``width`` MSB-first bits, concatenated."""
    if width == 0 or values.size == 0:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(width - 1, -1, -1, dtype=np.int64)
    return ((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8).ravel()
