"""The counter-based generator behind seeded weights (``model/seed-v2``; docs/seed-format.md).

A model shipped as a seed is only useful if every client rebuilds the same bits, whatever its
language. numpy's PCG64 + SeedSequence (the v1 generator) is specified by numpy's source alone;
this one needs nothing but SHA-256, wrapping 64-bit integer arithmetic and IEEE-754 doubles:

* key of a tensor: the first 8 bytes (u64 little-endian) of
  ``SHA-256(KEY_DOMAIN || u64-LE seed || UTF-8 tensor name)``;
* word ``i`` (0, 1, 2, ...): SplitMix64's finaliser applied to ``key + (i + 1) * GOLDEN``
  (mod 2^64), i.e. the SplitMix64 stream started at ``key``;
* uniform ``u_i = (word_i >> 11) * 2^-53`` in [0, 1); a value in ``(-b, b)`` is
  ``float32(round-to-nearest-even((2 u_i - 1) * b))`` with ``b = 1 / sqrt(fan_in)`` in doubles.

Each element depends only on (seed, tensor name, index), so a tensor's values are the same
whatever other tensors exist or in which order they are filled. ``GENERATOR`` names this whole
recipe (stream and distributions, shared/models/init.py); any change to either needs a new name.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np

GENERATOR = "splitmix64-sha256/1"
KEY_DOMAIN = b"edgeloop/seed/v2\x00"
SEED_LIMIT = 1 << 63  # seeds lie in [0, 2^63): a signed 64-bit column holds every one
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
_BLOCK = 1 << 20  # elements per vectorised block: bounds temporaries for huge tensors


def check_seed(seed: object) -> int:
    """``seed`` as an int in [0, 2^63); ValueError naming it otherwise (bools are refused)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def tensor_key(seed: int, name: str) -> int:
    """The 64-bit stream key of tensor ``name`` (its state-dict key) under ``seed``."""
    message = KEY_DOMAIN + check_seed(seed).to_bytes(8, "little") + name.encode("utf-8")
    return int.from_bytes(hashlib.sha256(message).digest()[:8], "little")


def stream(key: int, count: int, start: int = 0) -> np.ndarray:
    """Words ``start .. start + count - 1`` of the SplitMix64 stream started at ``key``."""
    if count < 0 or start < 0 or start + count > 1 << 64:
        raise ValueError(f"count and start must be >= 0 and within 2^64, got {count}, {start}")
    # uint64 array arithmetic wraps mod 2^64, exactly what the definition asks for.
    z = np.arange(start + 1, start + count + 1, dtype=np.uint64)
    z *= np.uint64(GOLDEN)
    z += np.uint64(key)
    z ^= z >> np.uint64(30)
    z *= np.uint64(MIX1)
    z ^= z >> np.uint64(27)
    z *= np.uint64(MIX2)
    z ^= z >> np.uint64(31)
    return z


def words(seed: int, name: str, count: int, start: int = 0) -> np.ndarray:
    """Words ``start .. start + count - 1`` of tensor ``name``'s stream, as uint64."""
    return stream(tensor_key(seed, name), count, start)


def bound(fan_in: int) -> float:
    """``1 / sqrt(fan_in)`` in doubles (both operations correctly rounded by IEEE-754)."""
    if isinstance(fan_in, bool) or not isinstance(fan_in, int) or fan_in < 1:
        raise ValueError(f"fan_in must be a positive integer, got {fan_in!r}")
    return 1.0 / math.sqrt(float(fan_in))


def uniform(seed: int, name: str, count: int, fan_in: int) -> np.ndarray:
    """``count`` float32 values uniform in ``(-1/sqrt(fan_in), 1/sqrt(fan_in))`` for tensor
    ``name`` (flat, C order): torch's default Linear/Conv initialisation, bit-exact."""
    b = bound(fan_in)
    out = np.empty(count, dtype=np.float32)
    for start in range(0, count, _BLOCK):
        n = min(_BLOCK, count - start)
        u = (words(seed, name, n, start) >> np.uint64(11)).astype(np.float64) * 2.0**-53  # exact
        # 2u - 1 is exact; the product rounds once, the cast to float32 once more (to nearest
        # even), so the bits are those of any IEEE-754 implementation.
        out[start : start + n] = ((2.0 * u - 1.0) * b).astype(np.float32)
    return out
