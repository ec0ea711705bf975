"""The DRESS objective as a loss function (thesis §3.3.3, Eq. 3.4-3.7, Alg. 3.1 lines 6-11).

``dress_loss(model, x, y)`` samples the K subnets from the *current* dense weights (row orders,
and optionally the layer-wise allocation, are recomputed on every call), runs each subnet on the
batch and returns ``sum_k pi_k * loss(w ⊙ m_k)``. Back-propagating that scalar gives exactly
Eq. 3.5's accumulated backbone gradient ``sum_k pi_k dℓ(w_k)/dw_k ⊙ m_k`` because each subnet's
weight is ``w * m_k``. Any training loop that takes ``loss_fn(model, x, y)`` (e.g. the DPU
retraining on the server) can therefore improve every subnet with each update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from shared.dress.costs import layer_costs
from shared.dress.layers import DressError, sparse_layers
from shared.dress.masks import DressMask
from shared.dress.sampling import (
    DEFAULT_GAMMA,
    Allocation,
    allocate_sparsity,
    loss_weights,
    row_ranks,
)
from shared.tensors import to_model_input

Criterion = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def backbone_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer name: dense weight}`` of the sparse layers, in model order."""
    return {name: weight for name, (_, weight) in _weight_slots(model).items()}


def _weight_slots(model: nn.Module) -> dict[str, tuple[str, torch.Tensor]]:
    """``{layer: (functional_call key, dense weight)}``. A weight under someone else's
    parametrization (e.g. a DPU gradient mask) is masked at its ``original``, so both compose."""
    modules = dict(model.named_modules())
    slots = {}
    for layer in sparse_layers(model):
        module = modules[layer.name]
        if parametrize.is_parametrized(module, "weight"):
            chain = module.parametrizations.weight
            if any(isinstance(p, DressMask) for p in chain):
                raise DressError(
                    f"layer {layer.name!r} has DRESS masks applied; "
                    "remove SubnetMasks before training"
                )
            slots[layer.name] = (f"{layer.name}.parametrizations.weight.original", chain.original)
        else:
            slots[layer.name] = (f"{layer.name}.weight", module.weight)
    return slots


def subnet_losses(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    allocation: Allocation,
    criterion: Criterion | None = None,
) -> list[torch.Tensor]:
    """Unweighted loss ``ℓ(w ⊙ m_k)`` of every subnet (Alg. 3.1 lines 8-10), masks from the
    current weights. Each subnet is a ``functional_call`` with masked weights, so the model's
    parameters are never copied or modified; BN running statistics are shared (stage 2)."""
    criterion = criterion or F.cross_entropy
    slots = _weight_slots(model)
    if tuple(slots) != allocation.layers:
        raise DressError(
            f"allocation covers layers {list(allocation.layers)}, model has {list(slots)}"
        )
    if x.dtype == torch.uint8:
        x = to_model_input(x)
    with torch.no_grad():
        ranks = {name: row_ranks(w).view_as(w) for name, (_, w) in slots.items()}
    losses = []
    for k in range(allocation.num_subnets):
        params = {
            key: w * (ranks[name] < allocation.counts[k][li])
            for li, (name, (key, w)) in enumerate(slots.items())
        }
        losses.append(criterion(functional_call(model, params, (x,)), y))
    return losses


def dress_loss(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    sparsities: Sequence[float] | None = None,
    *,
    gamma: float = DEFAULT_GAMMA,
    allocation: Allocation | None = None,
    allocation_mode: str = "global",
    criterion: Criterion | None = None,
) -> torch.Tensor:
    """Eq. 3.4: ``sum_k pi_k * ℓ(w ⊙ m_k)`` with ``pi_k`` from Eq. 3.6-3.7.

    Pass ``allocation`` (from :func:`allocate_sparsity`) to fix the layer-wise sparsity as
    Alg. 3.1 does between re-allocations; without it the allocation is recomputed from the
    current weights on every call (one global sort of all weights, ``allocation_mode`` as in
    :func:`allocate_sparsity`), which is what a caller that only knows ``sparsities`` wants.
    """
    if allocation is None:
        if sparsities is None:
            raise DressError("dress_loss needs sparsities or an allocation")
        costs = layer_costs(model, x.shape[1:]) if allocation_mode == "latency" else None
        allocation = allocate_sparsity(
            {k: w.detach() for k, w in backbone_weights(model).items()},
            sparsities,
            allocation_mode,
            costs=costs,
        )
    elif sparsities is not None and tuple(float(s) for s in sparsities) != allocation.sparsities:
        raise DressError(
            f"sparsities {list(sparsities)} differ from the allocation's "
            f"{list(allocation.sparsities)}"
        )
    pis = loss_weights(allocation.sparsities, gamma)
    losses = subnet_losses(model, x, y, allocation, criterion)
    return torch.stack([p * loss for p, loss in zip(pis, losses, strict=True)]).sum()


class DressLoss:
    """``loss_fn(model, x, y)`` closure over :func:`dress_loss`'s settings.

    Example: ``train(model, loss_fn=DressLoss((0.5, 0.8, 0.9, 0.95)))``.
    """

    def __init__(
        self,
        sparsities: Sequence[float] | None = None,
        *,
        gamma: float = DEFAULT_GAMMA,
        allocation: Allocation | None = None,
        allocation_mode: str = "global",
        criterion: Criterion | None = None,
    ) -> None:
        if allocation is None:
            if sparsities is None:
                raise DressError("DressLoss needs sparsities or an allocation")
            loss_weights(sparsities, gamma)  # validate early
        self.sparsities = tuple(sparsities) if sparsities is not None else None
        self.gamma = gamma
        self.allocation = allocation
        self.allocation_mode = allocation_mode
        self.criterion = criterion

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return dress_loss(
            model,
            x,
            y,
            None if self.allocation is not None else self.sparsities,
            gamma=self.gamma,
            allocation=self.allocation,
            allocation_mode=self.allocation_mode,
            criterion=self.criterion,
        )
