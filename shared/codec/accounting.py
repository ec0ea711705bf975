"""The thesis's communication accounting for DPU updates (Sec. 5.5, "Indexing")."""

from __future__ import annotations

import math


def binary_entropy(k: float) -> float:
    """H(k) = -k log2 k - (1-k) log2(1-k) in bits; 0 at k in {0, 1}."""
    if not 0.0 <= k <= 1.0:
        raise ValueError(f"density k must lie in [0, 1], got {k}")
    if k in (0.0, 1.0):
        return 0.0
    return -k * math.log2(k) - (1.0 - k) * math.log2(1.0 - k)


def ideal_paper_bits(k: float, num_weights: int, value_bits: int = 32) -> float:
    """S_w*k*I + S_x(k)*I: the bits the thesis reports per update, with S_x(k) = H(k), the
    Shannon bound for a random mask of density k (no header, no framing, no biases apart)."""
    if num_weights < 0 or value_bits <= 0:
        raise ValueError(
            f"need num_weights >= 0 and value_bits > 0, got {num_weights}, {value_bits}"
        )
    return value_bits * k * num_weights + binary_entropy(k) * num_weights
