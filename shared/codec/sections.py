"""Section contents: index codings, value codings and per-section compression.

Every decoder here checks that a section is consumed exactly (lengths, counts, zero padding),
so one diff has one byte representation and a corrupt section cannot pass for a valid one.
"""

from __future__ import annotations

import numpy as np
import zstandard

from shared.alq.vector import MAX_BITS as ALQ_MAX_BITS
from shared.alq.vector import AlqCode, group_sizes
from shared.alq.vector import decode_values as alq_decode
from shared.codec.arith import INT8_MAX
from shared.codec.bitio import pack_bits, unpack_bits
from shared.codec.errors import (
    BadIndicesError,
    BadValuesError,
    DiffError,
    LimitError,
    TrailingDataError,
    UnknownEncodingError,
)
from shared.codec.golomb import best_parameter, golomb_decode, golomb_encode
from shared.codec.wire import (
    C_NONE,
    C_SHUFFLE_ZSTD,
    I_BITMAP,
    I_GOLOMB,
    I_GOLOMB_COMPLEMENT,
    V_ALQ,
    V_FP16,
    V_INT8,
    V_INT8_GOLOMB,
    V_RAW,
    Entry,
    Section,
)

# ---------------------------------------------------------------- compression


def shuffle(raw: bytes, elem: int) -> bytes:
    """Byte planes: all first bytes, then all second bytes, ... (sign/exponent bytes of floats
    cluster, which zstd then finds)."""
    return np.frombuffer(raw, np.uint8).reshape(-1, elem).T.tobytes()


def unshuffle(raw: bytes, elem: int) -> bytes:
    return np.frombuffer(raw, np.uint8).reshape(elem, -1).T.tobytes()


def compress(raw: bytes, compression: int, elem: int, cctx: zstandard.ZstdCompressor) -> bytes:
    if compression == C_NONE:
        return raw
    if compression == C_SHUFFLE_ZSTD:
        raw = shuffle(raw, elem)
    return cctx.compress(raw)


def decompress(stored: memoryview, sec: Section, elem: int, what: str) -> bytes:
    """Raw bytes of a section whose raw length the caller already bounded."""
    if sec.compression == C_NONE:
        return bytes(stored)
    if sec.compression == C_SHUFFLE_ZSTD and elem <= 1:
        raise UnknownEncodingError(f"{what}: byte shuffle is only defined for multi-byte values")
    if sec.compression == C_SHUFFLE_ZSTD and sec.raw_len % elem:
        raise BadValuesError(
            f"{what}: shuffled section of {sec.raw_len} bytes is not whole {elem}-byte values"
        )
    try:
        declared = zstandard.get_frame_parameters(stored).content_size
        if declared != sec.raw_len:  # also refuses frames without a content size
            raise LimitError(
                f"{what}: zstd frame declares {declared} bytes, table says {sec.raw_len}"
            )
        raw = zstandard.ZstdDecompressor().decompress(
            stored, max_output_size=sec.raw_len, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise DiffError(f"{what}: corrupt zstd frame: {exc}") from exc
    if len(raw) != sec.raw_len:
        raise DiffError(f"{what}: zstd frame gave {len(raw)} bytes, table says {sec.raw_len}")
    return unshuffle(raw, elem) if sec.compression == C_SHUFFLE_ZSTD else raw


def _check_padding(bits: np.ndarray, end: int, raw: bytes, what: str) -> None:
    if (end + 7) // 8 != len(raw) or bits[end:].any():
        raise TrailingDataError(
            f"{what}: {len(raw)} bytes hold {end} bits of codes plus stray bits"
        )


# ---------------------------------------------------------------- indices


def gaps_of(positions: np.ndarray) -> np.ndarray:
    """Sorted positions -> gaps: the first position, then (distance - 1) between neighbours."""
    return np.diff(positions, prepend=-1) - 1


def encode_index(positions: np.ndarray, numel: int, coding: int) -> tuple[bytes, int]:
    """Raw index-section bytes and the Golomb parameter (0 for bitmaps)."""
    if coding == I_BITMAP:
        bitmap = np.zeros(numel, dtype=np.uint8)
        bitmap[positions] = 1
        return pack_bits(bitmap), 0
    if coding == I_GOLOMB_COMPLEMENT:
        keep = np.ones(numel, dtype=bool)
        keep[positions] = False
        positions = np.flatnonzero(keep)
    gaps = gaps_of(positions)
    m = best_parameter(gaps)
    return pack_bits(golomb_encode(gaps, m)), m


def decode_index(raw: bytes, e: Entry, what: str) -> np.ndarray:
    """Sorted, distinct flat positions in ``[0, numel)``; exactly ``e.nnz`` of them."""
    numel, bits = e.numel, unpack_bits(raw)
    if e.index_coding == I_BITMAP:
        if len(raw) != (numel + 7) // 8:
            raise BadIndicesError(f"{what}: bitmap of {len(raw)} bytes for {numel} elements")
        _check_padding(bits, numel, raw, what)
        positions = np.flatnonzero(bits[:numel])
        if positions.size != e.nnz:
            raise BadIndicesError(
                f"{what}: bitmap marks {positions.size} positions, table says {e.nnz}"
            )
        return positions
    count = e.nnz if e.index_coding == I_GOLOMB else numel - e.nnz
    gaps, end = golomb_decode(bits, 0, count, e.index_m, numel - 1, BadIndicesError, what)
    _check_padding(bits, end, raw, what)
    positions = np.cumsum(gaps + 1) - 1  # each gap < numel <= 2**31: no int64 overflow
    if positions.size and positions[-1] >= numel:
        raise BadIndicesError(
            f"{what}: index {int(positions[-1])} out of range for {numel} elements"
        )
    if e.index_coding == I_GOLOMB:
        return positions
    keep = np.ones(numel, dtype=bool)
    keep[positions] = False
    return np.flatnonzero(keep)


# ---------------------------------------------------------------- values


def value_elem_size(e: Entry) -> int:
    """Bytes per value of the fixed-size codings (the shuffle plane count); 1 otherwise."""
    return {V_RAW: e.wd.itemsize, V_FP16: 2}.get(e.value_coding, 1)


def max_raw_len(e: Entry, index: bool) -> int:
    """Exact raw length of fixed-size sections, a generous bound for Golomb-coded ones."""
    if index:
        return (e.numel + 7) // 8 if e.index_coding == I_BITMAP else 5 * e.numel + 8
    if e.value_coding == V_INT8_GOLOMB:
        return 17 * e.nnz + 8  # m = 1 codes magnitude 127 in 128 bits, plus a sign bit
    if e.value_coding == V_ALQ:  # widths + 8 fp16 coordinates per group + 8 bits per value
        groups = -(-e.nnz // max(1, e.alq_group))
        return (groups + 1) // 2 + 2 * ALQ_MAX_BITS * groups + e.nnz
    return e.nnz * value_elem_size(e)


def encode_int8_golomb(q: np.ndarray) -> tuple[bytes, int, int]:
    """int8 values -> (raw bytes, qmin, m): Golomb(|q| - qmin), then one sign bit per value."""
    mag = np.abs(q.astype(np.int64))
    qmin = int(mag.min()) if mag.size else 0
    m = best_parameter(mag - qmin)
    bits = np.concatenate([golomb_encode(mag - qmin, m), (q < 0).astype(np.uint8)])
    return pack_bits(bits), qmin, m


def encode_alq(code: AlqCode) -> bytes:
    """The alq value section (docs/diff-format.md §6): width nibbles, fp16 coordinates, sign bits."""
    w = code.widths.astype(np.uint8)
    nib = np.zeros(2 * ((len(w) + 1) // 2), dtype=np.uint8)
    nib[: len(w)] = w
    widths = (nib[0::2] << 4) | nib[1::2]
    return widths.tobytes() + code.alphas.astype("<f2").tobytes() + pack_bits(code.signs.astype(np.uint8))


def decode_alq(raw: bytes, n: int, group: int, what: str) -> AlqCode:
    """Parse and check an alq value section of ``n`` values; refuses anything but the one
    canonical form (widths <= 8, coordinates finite and > 0, exact length, zero padding)."""
    sizes = group_sizes(n, group)
    G = len(sizes)
    head = (G + 1) // 2
    if len(raw) < head:
        raise BadValuesError(f"{what}: {len(raw)} bytes cannot hold {G} group widths")
    nibbles = np.frombuffer(raw[:head], np.uint8)
    both = np.stack([nibbles >> 4, nibbles & 0x0F], axis=1).reshape(-1)
    if G % 2 and both[-1]:
        raise TrailingDataError(f"{what}: the unused last width nibble must be zero")
    widths = both[:G].astype(np.uint8)
    if (widths > ALQ_MAX_BITS).any():
        raise BadValuesError(f"{what}: a group width {int(widths.max())} exceeds {ALQ_MAX_BITS}")
    n_alpha = int(widths.astype(np.int64).sum())
    n_bits = int((widths.astype(np.int64) * sizes).sum())
    expected = head + 2 * n_alpha + (n_bits + 7) // 8
    if len(raw) != expected:
        raise BadValuesError(f"{what}: {len(raw)} value bytes, expected {expected} for these widths")
    alphas = np.frombuffer(raw[head : head + 2 * n_alpha], np.dtype("<f2"))
    if not (np.isfinite(alphas) & (alphas > 0)).all():
        raise BadValuesError(f"{what}: alq coordinates must be finite and greater than zero")
    sign_raw = raw[head + 2 * n_alpha :]
    bits = unpack_bits(sign_raw)
    _check_padding(bits, n_bits, sign_raw, what)
    return AlqCode(n, group, widths, alphas.copy(), bits[:n_bits].astype(bool))


def decode_values(raw: bytes, e: Entry, what: str) -> np.ndarray:
    n = e.nnz
    if e.value_coding in (V_FP16, V_INT8, V_INT8_GOLOMB, V_ALQ) and not e.wd.is_float:
        raise UnknownEncodingError(
            f"{what}: value coding {e.value_coding} needs a float tensor, not {e.wd.name}"
        )
    if e.scale is not None and not (np.isfinite(e.scale) and e.scale > 0):
        raise BadValuesError(f"{what}: int8 scale {float(e.scale)} is not a positive finite number")
    if e.value_coding == V_INT8_GOLOMB:
        if e.qmin > INT8_MAX:
            raise BadValuesError(f"{what}: smallest magnitude {e.qmin} exceeds {INT8_MAX}")
        bits = unpack_bits(raw)
        mag, end = golomb_decode(bits, 0, n, e.value_m, INT8_MAX - e.qmin, BadValuesError, what)
        if end + n > bits.size:
            raise BadValuesError(f"{what}: sign bits run past the section end")
        sign = bits[end : end + n].astype(bool)
        _check_padding(bits, end + n, raw, what)
        mag = mag + e.qmin
        if (sign & (mag == 0)).any():
            raise BadValuesError(f"{what}: negative zero is not a canonical int8 value")
        return np.where(sign, -mag, mag).astype(np.int8)
    if e.value_coding == V_ALQ:
        return alq_decode(decode_alq(raw, n, e.alq_group, what))
    expected = n * value_elem_size(e)
    if len(raw) != expected:
        raise BadValuesError(f"{what}: {len(raw)} value bytes, expected {expected} for {n} values")
    if e.value_coding == V_RAW:
        values = np.frombuffer(raw, e.wd.storage)
        if e.wd.name == "BOOL" and (values > 1).any():
            raise BadValuesError(f"{what}: bool values must be 0 or 1")
        return values
    if e.value_coding == V_FP16:
        return np.frombuffer(raw, np.dtype("<f2"))
    values = np.frombuffer(raw, np.int8)
    if (values < -INT8_MAX).any():
        raise BadValuesError(f"{what}: int8 value -128 is outside the symmetric range")
    return values
