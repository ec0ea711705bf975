"""Serialise a :class:`SparseUpdate` as ``diff/sparse-v1`` bytes, picking per tensor the
smallest of the codings the format offers (measured, not guessed)."""

from __future__ import annotations

import re
import zlib
from typing import Any

import numpy as np
import torch
import zstandard

from shared.codec.arith import ALQ, FP16, RAW
from shared.codec.dtypes import to_storage
from shared.codec.sections import compress, encode_alq, encode_index, encode_int8_golomb
from shared.codec.update import SparseUpdate, TensorDelta
from shared.codec.wire import (
    C_NONE,
    C_SHUFFLE_ZSTD,
    C_ZSTD,
    CHECKSUM_BYTES,
    I_BITMAP,
    I_GOLOMB,
    I_GOLOMB_COMPLEMENT,
    LAYOUT_DENSE,
    LAYOUT_SPARSE,
    V_ALQ,
    V_FP16,
    V_INT8,
    V_INT8_GOLOMB,
    V_RAW,
    Entry,
    Section,
    pack_header,
    write_entry,
)

_HEX64 = re.compile(r"[0-9a-f]{64}")
MIN_ZSTD_BYTES = 16  # below this a zstd frame (>= ~12 bytes of framing) cannot win
DENSE_TRY_ELEMENTS = 4096  # small tensors: always measure the dense layout too


def _best_section(raw: bytes, elem: int, cctx: zstandard.ZstdCompressor) -> tuple[Section, bytes]:
    """The smallest of: as is, zstd, byte-shuffle + zstd (multi-byte values only)."""
    options = [(C_NONE, raw)]
    if len(raw) >= MIN_ZSTD_BYTES:
        options.append((C_ZSTD, compress(raw, C_ZSTD, elem, cctx)))
        if elem > 1:
            options.append((C_SHUFFLE_ZSTD, compress(raw, C_SHUFFLE_ZSTD, elem, cctx)))
    comp, stored = min(options, key=lambda o: len(o[1]) + (0 if o[0] == C_NONE else 3))
    return Section(comp, len(stored), len(raw)), stored


Option = tuple[dict[str, Any], bytes]  # Entry fields, stored section bytes


def _value_options(
    d: TensorDelta, values: np.ndarray, cctx: zstandard.ZstdCompressor
) -> list[Option]:
    """Candidate value sections for ``values`` (``d.coding`` semantics)."""
    if d.coding == RAW:
        sec, stored = _best_section(values.astype(d.wd.storage).tobytes(), d.wd.itemsize, cctx)
        return [(dict(value_coding=V_RAW, values=sec), stored)]
    if d.coding == FP16:
        sec, stored = _best_section(values.astype("<f2").tobytes(), 2, cctx)
        return [(dict(value_coding=V_FP16, values=sec), stored)]
    if d.coding == ALQ:
        assert d.alq is not None
        sec, stored = _best_section(encode_alq(d.alq), 1, cctx)
        return [(dict(value_coding=V_ALQ, values=sec, alq_group=d.alq.group), stored)]
    plain, plain_stored = _best_section(values.astype(np.int8).tobytes(), 1, cctx)
    raw, qmin, m = encode_int8_golomb(values)
    golomb = Section(C_NONE, len(raw), len(raw))
    return [
        (dict(value_coding=V_INT8, values=plain, scale=d.scale), plain_stored),
        (dict(value_coding=V_INT8_GOLOMB, values=golomb, scale=d.scale, qmin=qmin, value_m=m), raw),
    ]


def _index_options(d: TensorDelta, cctx: zstandard.ZstdCompressor) -> list[Option]:
    if d.indices is None:  # a dense delta (every position): only the dense layout carries it
        return []
    codings = [I_GOLOMB, I_BITMAP]
    if 2 * d.nnz > d.numel:
        codings.append(I_GOLOMB_COMPLEMENT)
    out = []
    for coding in codings:
        raw, m = encode_index(d.indices, d.numel, coding)
        sec, stored = _best_section(raw, 1, cctx)
        out.append((dict(index_coding=coding, index_m=m, index=sec), stored))
    return out


def _dense_values(d: TensorDelta, target: torch.Tensor) -> np.ndarray:
    if d.coding == RAW:
        return to_storage(target)
    full = np.zeros(d.numel, dtype=np.float16 if d.coding == FP16 else np.int8)
    full[d.indices] = d.values
    return full


def _encode_delta(
    d: TensorDelta, target: torch.Tensor, cctx: zstandard.ZstdCompressor
) -> tuple[Entry, bytes]:
    """The smallest (entry, section bytes) over layouts and codings for one tensor.

    The dense layout is measured too when at least half the tensor changes, or when the
    tensor is small.
    """
    common: dict[str, Any] = dict(name=d.name, wd=d.wd, shape=d.shape)
    values = _value_options(d, d.values, cctx)
    candidates = [
        (Entry(layout=LAYOUT_SPARSE, nnz=d.nnz, **common, **idx, **val), idx_stored + stored)
        for idx, idx_stored in _index_options(d, cctx)
        for val, stored in values
    ]
    # (alq groups follow the carried values' order, so only the sparse layout carries them)
    if d.coding != ALQ and (2 * d.nnz >= d.numel or d.numel <= DENSE_TRY_ELEMENTS):
        candidates += [
            (Entry(layout=LAYOUT_DENSE, nnz=d.numel, **common, **val), stored)
            for val, stored in _value_options(d, _dense_values(d, target), cctx)
        ]
    return min(candidates, key=lambda c: len(write_entry(c[0])) + len(c[1]))


def encode_update(update: SparseUpdate, base_hash: str, *, zstd_level: int = 19) -> bytes:
    """``diff/sparse-v1`` bytes that turn the model hashing to ``base_hash`` into
    ``update.target`` (layout: docs/diff-format.md)."""
    if not isinstance(base_hash, str) or not _HEX64.fullmatch(base_hash):
        raise ValueError(f"base_hash must be 64 lowercase hex digits, got {base_hash!r}")
    if base_hash != update.base_hash:
        raise ValueError(
            f"base_hash {base_hash[:16]} is not the base this update was made from "
            f"({update.base_hash[:16]})"
        )
    if not 1 <= zstd_level <= 22:
        raise ValueError(f"zstd_level must lie in [1, 22], got {zstd_level}")
    cctx = zstandard.ZstdCompressor(
        level=zstd_level, write_content_size=True, write_checksum=False, write_dict_id=False
    )
    table, data = bytearray(), bytearray()
    names = sorted(update.deltas, key=lambda n: n.encode("utf-8"))
    for name in names:
        entry, stored = _encode_delta(update.deltas[name], update.target[name], cctx)
        table += write_entry(entry)
        data += stored
    body = (
        pack_header(base_hash, update.target_hash, len(names), len(table), len(data)) + table + data
    )
    return bytes(body) + (zlib.crc32(body) & 0xFFFFFFFF).to_bytes(CHECKSUM_BYTES, "little")
