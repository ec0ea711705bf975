"""Golomb codes for non-negative integers, vectorised with numpy, in a split-stream layout.

Why Golomb: the gaps between the positions of a uniformly random k-sparse mask are geometric,
and the Golomb code is the optimal prefix code for geometric sources (Gallager & Van Voorhis,
1975). Measured on 784x512 and 512x512 masks (bench/codec.py) it stays within 1% of the
Shannon bound H(k)*I of the thesis's index accounting (Sec. 5.5, "Indexing") for
k in [0.001, 0.2]; Rice codes (m a power of two) lose up to 2.3%, Elias-Fano 5-18%, a
zstd-compressed bitmap 2-65%. A bitmap entropy coder (rANS / arithmetic) would reach the bound too, but needs a
per-symbol loop that is slow in Python; Golomb decodes with a handful of numpy passes.

Layout of ``count`` values coded with parameter ``m >= 1`` (``b = ceil(log2 m)``,
``u = 2**b - m``): each value ``v`` is split into ``q = v // m`` and ``r = v % m``.

1. unary stream: for each value, ``q`` zero bits then a one bit;
2. field stream: for each value (only if ``b >= 2``) the ``b - 1``-bit MSB-first field
   ``f = r`` if ``r < u`` else ``(r + u) >> 1``;
3. extra stream: for each value with ``f >= u`` (in order) the bit ``(r + u) & 1``.

This carries exactly the bits of the textbook Golomb codeword (unary quotient, truncated
binary remainder), only regrouped so that streams 2 and 3 are fixed-width and decode without
a sequential scan: ``r = f`` if ``f < u`` else ``2 * f + extra - u``.
"""

from __future__ import annotations

import math

import numpy as np

from shared.codec.bitio import bits_to_uint, uint_to_bits
from shared.codec.errors import DiffError, TruncatedDiffError

MAX_PARAMETER = 1 << 31


def _split(m: int) -> tuple[int, int]:
    b = (m - 1).bit_length()  # ceil(log2 m); 0 for m == 1
    return b, (1 << b) - m


def golomb_cost(values: np.ndarray, m: int) -> int:
    """Exact number of bits :func:`golomb_encode` emits for ``values`` with parameter ``m``."""
    if values.size == 0:
        return 0
    b, u = _split(m)
    q, r = np.divmod(values, m)
    bits = int(q.sum()) + values.size
    if b >= 1:
        f = np.where(r < u, r, (r + u) >> 1)
        bits += values.size * (b - 1) + int(np.count_nonzero(f >= u))
    return bits


def best_parameter(values: np.ndarray) -> int:
    """The ``m`` minimising :func:`golomb_cost` among candidates around the geometric optimum.

    For a geometric source with mean ``mu`` the optimal ``m`` is
    ``ceil(log(1 + theta) / -log(theta))`` with ``theta = mu / (1 + mu)``; real gap
    distributions are not exactly geometric, so we measure a grid of 0.5x..2x around it.
    """
    if values.size == 0:
        return 1
    mu = float(values.mean())
    if mu <= 0:
        return 1
    theta = mu / (1.0 + mu)
    m_star = max(1, math.ceil(math.log1p(theta) / -math.log(theta)))
    candidates = {1, 2, 3, 4}
    candidates |= {max(1, round(m_star * 2 ** (i / 16))) for i in range(-16, 17)}
    candidates = {min(m, MAX_PARAMETER) for m in candidates}
    return min(sorted(candidates), key=lambda m: golomb_cost(values, m))


def golomb_encode(values: np.ndarray, m: int) -> np.ndarray:
    """Non-negative int64 ``values`` -> 0/1 uint8 bit array (layout in the module docstring)."""
    if not 1 <= m <= MAX_PARAMETER:
        raise ValueError(f"Golomb parameter must lie in [1, {MAX_PARAMETER}], got {m}")
    values = np.asarray(values, dtype=np.int64)
    if values.size and int(values.min()) < 0:
        raise ValueError("Golomb codes need non-negative values")
    b, u = _split(m)
    q, r = np.divmod(values, m)
    unary = np.zeros(int(q.sum()) + values.size, dtype=np.uint8)
    unary[np.cumsum(q + 1) - 1] = 1
    if b == 0:
        return unary
    f = np.where(r < u, r, (r + u) >> 1)
    extra = ((r + u) & 1)[f >= u].astype(np.uint8)
    return np.concatenate([unary, uint_to_bits(f, b - 1), extra])


def golomb_decode(
    bits: np.ndarray,
    start: int,
    count: int,
    m: int,
    max_value: int,
    error: type[DiffError],
    what: str,
) -> tuple[np.ndarray, int]:
    """Decode ``count`` values starting at bit ``start``; returns ``(values, end bit)``.

    Refuses (``error``) any value above ``max_value`` before it could overflow int64, and
    raises :class:`TruncatedDiffError` when ``bits`` ends early.
    """
    if count == 0:
        return np.zeros(0, dtype=np.int64), start
    if not 1 <= m <= MAX_PARAMETER:
        raise error(f"{what}: Golomb parameter {m} outside [1, {MAX_PARAMETER}]")
    if count > bits.size - start:  # every value takes at least its terminating one bit
        raise TruncatedDiffError(f"{what}: {count} values cannot fit in {bits.size - start} bits")
    ones = np.flatnonzero(bits[start:])
    if ones.size < count:
        raise TruncatedDiffError(f"{what}: unary stream holds {ones.size} of {count} values")
    ends = ones[:count]
    q = np.diff(ends, prepend=-1) - 1
    if int(q.max()) > max_value // m:
        raise error(f"{what}: a decoded value exceeds {max_value}")
    pos = start + int(ends[-1]) + 1
    b, u = _split(m)
    r = np.zeros(count, dtype=np.int64)
    if b >= 1:
        width = b - 1
        if width:
            if pos + count * width > bits.size:
                raise TruncatedDiffError(f"{what}: remainder fields run past the section end")
            r = bits_to_uint(bits[pos : pos + count * width], width)
            pos += count * width
        long_ = r >= u
        n_extra = int(np.count_nonzero(long_))
        if pos + n_extra > bits.size:
            raise TruncatedDiffError(f"{what}: remainder extra bits run past the section end")
        r[long_] = 2 * r[long_] + bits[pos : pos + n_extra] - u
        pos += n_extra
    values = q * m + r
    if int(values.max()) > max_value:
        raise error(f"{what}: a decoded value exceeds {max_value}")
    return values, pos
