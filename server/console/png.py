"""A sample payload as a PNG image, for the console's labelling page (no imaging dependency:
PNG is zlib-compressed scanlines in three chunks)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

MAX_PIXELS = 4096 * 4096  # a payload is bounded by EDGELOOP_MAX_SAMPLE_BYTES anyway


class NotAnImageError(ValueError):
    """The tensor has no image reading (e.g. a 1-D feature vector)."""


def to_pixels(x: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3) RGB uint8 from a sample tensor: (H, W), (1, H, W), (3, H, W),
    (C, H, W) with other C (first channel) or (H, W, 3). float32 samples are min-max scaled,
    since their range is the agent's choice; uint8 ones are shown as they are."""
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 3:
        if a.shape[0] == 3:
            a = np.transpose(a, (1, 2, 0))
        elif a.shape[-1] == 3 and a.shape[0] not in (1, 3):
            pass
        else:
            a = a[0]
    if a.ndim not in (2, 3) or a.shape[0] < 1 or a.shape[1] < 1 or a.size > MAX_PIXELS * 3:
        raise NotAnImageError(f"a tensor of shape {list(x.shape)} is not an image")
    if a.dtype != np.uint8:
        f = np.nan_to_num(a.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(f.min()), float(f.max())
        f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
        a = np.round(f * 255).astype(np.uint8)
    return np.ascontiguousarray(a)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG bytes of (H, W) grey or (H, W, 3) RGB uint8 pixels (8 bits, no filter)."""
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] != 3):
        raise ValueError("pixels must be (H, W) or (H, W, 3) uint8")
    h, w = pixels.shape[:2]
    colour = 0 if pixels.ndim == 2 else 2
    rows = pixels.reshape(h, -1)
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(h))  # filter byte 0 per scanline
    header = struct.pack(">IIBBBBB", w, h, 8, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw, 6)) + _chunk(b"IEND", b"")
