"""Communication accounting (thesis §5.5 "Indexing") and the byte-budget -> k search."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from shared.dpu.config import DPUConfigError


def binary_entropy(k: float) -> float:
    """S_x(k) = k log2(1/k) + (1-k) log2(1/(1-k)): bits per weight to encode the mask."""
    if not 0.0 <= k <= 1.0:
        raise DPUConfigError(f"k={k} must lie in [0, 1]")
    if k in (0.0, 1.0):
        return 0.0
    return -k * math.log2(k) - (1.0 - k) * math.log2(1.0 - k)


def paper_update_bits(k: float, num_weights: int, value_bits: int = 32) -> float:
    """§5.5: S_w * k * I + S_x(k) * I bits for the partial weights and their encoded indices."""
    if num_weights < 0 or value_bits < 1:
        raise DPUConfigError(
            f"num_weights={num_weights} must be >= 0, value_bits={value_bits} >= 1"
        )
    return value_bits * k * num_weights + binary_entropy(k) * num_weights


def dense_bytes(state: Mapping[str, torch.Tensor], partial_names: Iterable[str]) -> int:
    """Bytes of the tensors shipped whole (biases, norm layers, BN statistics) at their dtype."""
    partial = set(partial_names)
    return sum(t.numel() * t.element_size() for n, t in state.items() if n not in partial)


def num_partial_weights(state: Mapping[str, torch.Tensor], partial_names: Iterable[str]) -> int:
    names = list(partial_names)
    missing = [n for n in names if n not in state]
    if missing:
        raise DPUConfigError(f"partial tensors {missing} are not in the model state")
    return sum(state[n].numel() for n in names)


def k_for_byte_budget(
    budget_bytes: int,
    model_state: Mapping[str, torch.Tensor],
    partial_names: Iterable[str],
    value_bits: int = 32,
    size_fn: Callable[[float], int] | None = None,
) -> float:
    """The largest k whose update fits ``budget_bytes`` ("ship at most B bytes per round").

    ``size_fn(k) -> bytes`` should be the codec's real encoded size; by default the paper's
    accounting ``ceil((S_w k I + S_x(k) I) / 8)`` plus :func:`dense_bytes`. Bisection runs over
    the integer count of selected weights, so the answer is ``n / I`` for an exact ``n`` and
    ``global_topk_mask(scores, k)`` selects exactly ``n`` weights. It assumes ``size_fn``
    grows with k (true for the default whenever ``k < 0.99``).
    """
    if budget_bytes < 0:
        raise DPUConfigError(f"budget_bytes={budget_bytes} must be >= 0")
    names = list(partial_names)
    total = num_partial_weights(model_state, names)
    if size_fn is None:
        dense = dense_bytes(model_state, names)

        def size_fn(k: float) -> int:
            return math.ceil(paper_update_bits(k, total, value_bits) / 8) + dense

    floor_size = size_fn(0.0)
    if floor_size > budget_bytes:
        raise DPUConfigError(
            f"budget of {budget_bytes} bytes is below the {floor_size} bytes an update with k=0 "
            "needs (dense tensors and headers)"
        )
    if total == 0 or size_fn(1.0) <= budget_bytes:
        return 1.0
    lo, hi = 0, total  # size(lo / total) fits, size(hi / total) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if size_fn(mid / total) <= budget_bytes:
            lo = mid
        else:
            hi = mid
    return lo / total
