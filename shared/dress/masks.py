"""Subnet masks as weight reparametrizations, plus per-subnet normalisation state.

Follows ``torch.nn.utils.parametrize`` and ``torch.ao.pruning``'s ``FakeSparsity``: every sparse
weight gets a :class:`DressMask` whose ``mask`` buffer is allocated once; ``.weight`` becomes
``original * mask``. Switching subnet rewrites the mask *contents* in place from the stored
within-row ranks (``mask = rank < n_{k,l}``), so no weight is copied and nothing is allocated.
Used to evaluate subnets and to fine-tune normalisation layers per subnet (§3.3.5).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from shared.dress.layers import DressError, dense_weight, sparse_layers
from shared.dress.sampling import Allocation, row_ranks

NORM_STATE = ("weight", "bias", "running_mean", "running_var")


class DressMask(nn.Module):
    """Parametrization ``w -> w * mask``; ``mask`` (bool) and ``rank`` (int32) are buffers."""

    mask: torch.Tensor
    rank: torch.Tensor

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer(
            "mask", torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
        )
        self.register_buffer("rank", row_ranks(weight).view(weight.shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask

    @torch.no_grad()
    def select(self, count: int | None) -> None:
        """Keep the top ``count`` weights of each row (all of them for ``None``), in place."""
        if count is None:
            self.mask.fill_(True)
        else:
            torch.lt(self.rank, count, out=self.mask)


def norm_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._NormBase]:
    """BatchNorm modules by name, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)}


def norm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of every norm layer's affine parameters and running statistics."""
    state = {}
    for name, m in norm_layers(model).items():
        for key in NORM_STATE:
            t = getattr(m, key, None)
            if t is not None:
                state[f"{name}.{key}"] = t.detach().clone()
    return state


@torch.no_grad()
def load_norm_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the norm layers in place (same storage, so optimizers stay valid)."""
    for name, m in norm_layers(model).items():
        for key in NORM_STATE:
            t = getattr(m, key, None)
            if t is None:
                continue
            fqn = f"{name}.{key}"
            if fqn not in state:
                raise DressError(f"norm state lacks {fqn!r}")
            if state[fqn].shape != t.shape:
                raise DressError(
                    f"norm state {fqn!r} has shape {tuple(state[fqn].shape)}, "
                    f"model {tuple(t.shape)}"
                )
            t.copy_(state[fqn])


class SubnetMasks:
    """Masks (and optionally per-subnet norm states) registered on ``model``.

    ``set_subnet(k)`` turns ``model`` into subnet ``k`` (``None``: the dense backbone) without
    copying weights; ``refresh()`` recomputes row ranks after the weights changed; ``remove()``
    restores the plain module with its dense weights (same Parameter objects).
    """

    def __init__(
        self,
        model: nn.Module,
        allocation: Allocation,
        norm_states: Sequence[Mapping[str, torch.Tensor]] | None = None,
    ) -> None:
        layers = [layer.name for layer in sparse_layers(model)]
        if tuple(layers) != allocation.layers:
            raise DressError(
                f"allocation covers layers {list(allocation.layers)}, model has {layers}"
            )
        if norm_states is not None and len(norm_states) != allocation.num_subnets:
            raise DressError(
                f"got {len(norm_states)} norm states for {allocation.num_subnets} subnets"
            )
        self.model = model
        self.allocation = allocation
        self.norm_states = list(norm_states) if norm_states is not None else None
        self.active: int | None = None
        modules = dict(model.named_modules())
        taken = [name for name in layers if parametrize.is_parametrized(modules[name], "weight")]
        if taken:  # checked up front so a failure leaves the model untouched
            raise DressError(f"layers {taken} are already parametrized")
        self._modules = [modules[name] for name in layers]
        self._masks: list[DressMask] = []
        for module in self._modules:
            mask = DressMask(module.weight.detach())
            parametrize.register_parametrization(module, "weight", mask)
            self._masks.append(mask)

    def set_subnet(self, k: int | None) -> None:
        if k is not None and not 0 <= k < self.allocation.num_subnets:
            raise DressError(f"subnet {k} out of range [0, {self.allocation.num_subnets})")
        for li, mask in enumerate(self._masks):
            mask.select(None if k is None else self.allocation.counts[k][li])
        if self.norm_states is not None and k is not None:
            load_norm_state(self.model, self.norm_states[k])
        self.active = k

    @torch.no_grad()
    def refresh(self) -> None:
        """Recompute row ranks from the current dense weights (keeps the buffers' storage)."""
        for mask, module in zip(self._masks, self._modules, strict=True):
            w = dense_weight(module)
            mask.rank.copy_(row_ranks(w).view(w.shape))
        self.set_subnet(self.active)

    def remove(self) -> None:
        for module in self._modules:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        self._masks.clear()
        self._modules.clear()

    def __enter__(self) -> SubnetMasks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
