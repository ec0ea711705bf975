"""Which weights a round may change: contributions (Eq. 5.6, 5.9, 5.10) and the global top-k.

All functions take and return dicts keyed by state-dict name, in the model's state-dict order;
that order also breaks ties in :func:`global_topk_mask`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from shared.dpu.config import DPUConfigError

ParamFilter = Callable[[str, torch.Tensor], bool]  # (name, parameter) -> partially updated?
Scores = Mapping[str, torch.Tensor]


def default_param_filter(module: nn.Module, name: str, param: torch.Tensor) -> bool:
    """Conv and fc weight tensors (``dim > 1``) are partially updated; §5.5.7 keeps biases and
    normalisation layers dense ("we do not impose sparsity ... on batch normalization and bias").
    """
    norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    return param.dim() > 1 and not isinstance(module, norm_types)


def partial_parameter_names(
    model: nn.Module, param_filter: ParamFilter | None = None
) -> tuple[str, ...]:
    """Names (state-dict order) of the parameters that are partially updated."""
    modules = dict(model.named_modules())
    names = []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param_filter is not None:
            chosen = param_filter(name, param)
        else:
            chosen = default_param_filter(modules[name.rpartition(".")[0]], name, param)
        if chosen:
            names.append(name)
    order = {n: i for i, n in enumerate(model.state_dict())}
    missing = [n for n in names if n not in order]
    if missing:
        raise DPUConfigError(f"partially updated parameters {missing} are not in the state dict")
    return tuple(sorted(names, key=order.__getitem__))


@torch.no_grad()
def global_contribution(start: Scores, final: Scores) -> dict[str, torch.Tensor]:
    """Eq. 5.6: ``c_global = dw^f * dw^f`` with ``dw^f = w^f - w``, per weight."""
    _same_keys(start, final, "start", "final")
    return {n: (final[n] - start[n]).float().square() for n in start}


@torch.no_grad()
def accumulate_local_contribution(
    c_local: Mapping[str, torch.Tensor],
    grads: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
) -> None:
    """One term of Eq. 5.9, in place: ``c_local -= g(w^{q-1}) * dw^q``.

    ``deltas`` must be the change the optimizer actually made (``w^q - w^{q-1}``), not
    ``lr * g``: with Adam or momentum the two differ, and Eq. 5.7 bounds the actual step.
    """
    for name, c in c_local.items():
        g = grads.get(name)
        if g is not None:  # a parameter without gradient did not contribute this step
            c.sub_(g * deltas[name])


def _normalised(c: Scores, what: str) -> dict[str, torch.Tensor]:
    total = math.fsum(float(t.double().sum()) for t in c.values())
    if not math.isfinite(total):
        raise DPUConfigError(f"{what} contribution sums to {total}; training diverged")
    if total <= 0.0:
        # Eq. 5.10 divides by 1^T c. The local sum can be <= 0 when the first-order model of the
        # loss says training made things worse overall; dividing by a negative sum would invert
        # the ranking, so fall back to the sum of magnitudes (and to 0 if nothing moved).
        total = math.fsum(float(t.double().abs().sum()) for t in c.values())
    if total == 0.0:
        return {n: torch.zeros_like(t, dtype=torch.float32) for n, t in c.items()}
    return {n: (t.double() / total).float() for n, t in c.items()}


def combined_contribution(c_local: Scores, c_global: Scores) -> dict[str, torch.Tensor]:
    """Eq. 5.10: ``c = c_global / 1^T c_global + c_local / 1^T c_local``.

    Each sum runs over every partially-updated weight of the model (one set, not per layer).
    """
    _same_keys(c_local, c_global, "c_local", "c_global")
    g = _normalised(c_global, "global")
    l_ = _normalised(c_local, "local")
    return {n: g[n] + l_[n] for n in c_global}


def magnitude_scores(state: Scores) -> dict[str, torch.Tensor]:
    """Pruning baseline [RFC20]: keep the weights (not increments) of largest magnitude."""
    return {n: t.float().square() for n, t in state.items()}


def random_scores(shapes: Mapping[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """RPU baseline: i.i.d. uniform scores from numpy's PCG64, so the mask is the same on
    every machine; with :func:`global_topk_mask` each layer gets ``k`` of its weights on average.
    """
    rng = np.random.Generator(np.random.PCG64(seed))
    return {
        n: torch.from_numpy(rng.random(math.prod(s)).astype(np.float32)).reshape(tuple(s))
        for n, s in shapes.items()
    }


def num_selected(k: float, num_weights: int) -> int:
    """round(k * I), rounding halves up, as an exact count in [0, I]."""
    if not 0.0 <= k <= 1.0:
        raise DPUConfigError(f"updating ratio k={k} must lie in [0, 1]")
    return min(num_weights, int(math.floor(k * num_weights + 0.5)))


@torch.no_grad()
def global_topk_mask(scores: Scores, k: float) -> dict[str, torch.Tensor]:
    """Alg. 5.2 line 10: mask with ones at the ``round(k * I)`` largest scores of the model.

    One ranking over all tensors together (layers compete for the budget). Ties go to the
    earlier tensor in ``scores`` order, then to the lower flat index, so the mask is exact and
    deterministic. Masks are CPU bool tensors shaped like the scores.
    """
    if not scores:
        raise DPUConfigError("no partially-updated tensors to select from")
    names = list(scores)
    flat = torch.cat([scores[n].detach().reshape(-1).to("cpu", torch.float32) for n in names])
    bad = [n for n in names if not torch.isfinite(scores[n]).all()]
    if bad:
        raise DPUConfigError(f"scores of {bad} contain NaN or infinity; training diverged")
    count = num_selected(k, flat.numel())
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    if count:
        order = torch.sort(flat, descending=True, stable=True).indices
        keep[order[:count]] = True
    masks, offset = {}, 0
    for n in names:
        size = scores[n].numel()
        masks[n] = keep[offset : offset + size].reshape(scores[n].shape)
        offset += size
    return masks


def _same_keys(a: Mapping, b: Mapping, a_name: str, b_name: str) -> None:
    if list(a) != list(b):
        raise DPUConfigError(f"{a_name} has tensors {list(a)} but {b_name} has {list(b)}")
    shapes = [n for n in a if a[n].shape != b[n].shape]
    if shapes:
        raise DPUConfigError(f"{a_name} and {b_name} differ in shape for {shapes}")
