"""Compact column sets for DRESS-CSR v2 (docs/dress.md, "DRESS-CSR v2 on disk").

The in-memory tables list each row's columns in importance order, which costs
``ceil(log2 N)`` bits per weight. That order is redundant: it is ``|value|`` descending, ties
by ascending column (the tables' own invariant), so a file only needs each row's *set* of
columns plus the values in column order; :func:`decode` sorts them back. A column set of a
row is stored in whichever is smaller for the layer (ties: bitmap):

* ``bitmap``: ``ceil(N / 8)`` bytes per row, bit ``j % 8`` (LSB first) of byte ``j // 8`` set
  when column ``j`` is kept; padding bits are zero;
* ``gap8``: per row, the gaps ``c_0, c_1 - c_0 - 1, ...`` between ascending columns, each as
  ``q`` bytes ``0xFF`` then one byte ``g - 255 q < 255``; rows are concatenated.

Decoding checks every byte: exactly ``n`` columns per row, all ``< N``, no stray padding bits,
no trailing or missing bytes. Pure functions over tensors, no I/O.
"""

from __future__ import annotations

import numpy as np
import torch

from shared.dress.layers import DressError

ENCODINGS = ("bitmap", "gap8")
ESCAPE = 255


def bitmap_size(rows: int, row_size: int) -> int:
    return rows * ((row_size + 7) // 8)


def gap8_size(cols: np.ndarray) -> int:
    """Bytes of the gap8 stream of ascending ``(G, n)`` columns."""
    return int((_gaps(cols) // ESCAPE + 1).sum())


def _gaps(cols: np.ndarray) -> np.ndarray:
    gaps = cols.astype(np.int64).copy()
    gaps[:, 1:] = np.diff(cols.astype(np.int64), axis=1) - 1
    return gaps


def encode(cols: torch.Tensor, row_size: int) -> tuple[str, torch.Tensor]:
    """``(encoding, uint8 bytes)`` of ascending ``(G, n)`` columns of a layer with ``N`` columns."""
    c = cols.to(torch.int64).numpy()
    g, n = c.shape
    if n and ((c[:, 0] < 0).any() or (c[:, -1] >= row_size).any() or (np.diff(c, axis=1) <= 0).any()):
        raise DressError("columns to encode must be strictly ascending and in range")
    if bitmap_size(g, row_size) <= gap8_size(c):
        bits = np.zeros((g, (row_size + 7) // 8 * 8), dtype=np.uint8)
        np.put_along_axis(bits, c, 1, axis=1)
        packed = np.packbits(bits, axis=1, bitorder="little")
        return "bitmap", torch.from_numpy(packed.reshape(-1).copy())
    gaps = _gaps(c).reshape(-1)
    q = gaps // ESCAPE
    out = np.full(int((q + 1).sum()), ESCAPE, dtype=np.uint8)
    ends = np.cumsum(q + 1) - 1  # each gap's last byte
    out[ends] = (gaps - ESCAPE * q).astype(np.uint8)
    return "gap8", torch.from_numpy(out)


def decode(encoding: str, data: torch.Tensor, rows: int, row_size: int, count: int) -> torch.Tensor:
    """Ascending int64 ``(rows, count)`` columns; raises :class:`DressError` on any bad byte."""
    if data.dtype != torch.uint8 or data.dim() != 1:
        raise DressError(f"column stream must be 1-D uint8, got {data.dtype} {tuple(data.shape)}")
    b = data.numpy()
    if encoding == "bitmap":
        width = (row_size + 7) // 8
        if b.size != rows * width:
            raise DressError(f"bitmap has {b.size} bytes, expected {rows * width}")
        bits = np.unpackbits(b.reshape(rows, width), axis=1, bitorder="little")
        if bits[:, row_size:].any():
            raise DressError("bitmap sets a padding bit beyond the row size")
        if (bits.sum(axis=1) != count).any():
            raise DressError(f"a bitmap row does not keep exactly {count} columns")
        cols = np.nonzero(bits[:, :row_size])[1].reshape(rows, count)
        return torch.from_numpy(cols.astype(np.int64))
    if encoding != "gap8":
        raise DressError(f"unknown column encoding {encoding!r}; expected one of {ENCODINGS}")
    ends = np.flatnonzero(b != ESCAPE)
    if ends.size != rows * count or (b.size and (ends.size == 0 or ends[-1] != b.size - 1)):
        raise DressError(f"gap8 stream holds {ends.size} gaps (or trailing escapes), "
                         f"expected {rows * count}")
    csum = np.cumsum(b.astype(np.int64))
    totals = csum[ends]
    gaps = np.diff(totals, prepend=0).reshape(rows, count) if ends.size else np.zeros((rows, 0), np.int64)
    cols = np.cumsum(gaps + 1, axis=1) - 1
    if count and (cols[:, -1] >= row_size).any():
        raise DressError(f"gap8 stream gives a column outside [0, {row_size})")
    return torch.from_numpy(cols.astype(np.int64))
