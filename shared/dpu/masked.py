"""Sparse fine-tuning (Alg. 5.2 lines 12-14): an optimizer that moves only masked weights."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from shared.dpu.config import DPUConfigError


class MaskedOptimizer:
    """Wraps a torch optimizer so that weights outside their mask never change, bit for bit.

    Zeroing the gradient is not enough: Adam with weight decay adds ``wd * w`` to it, and
    momentum (or Adam's moments) keeps moving a weight after its gradient stops. So the wrapper
    zeroes masked-out gradients (keeping the optimizer state clean) *and* writes back the
    values captured at construction after every step, i.e. ``w~ = w + (dw~ + dw^q) * m``.
    Parameters without a mask are updated normally (biases, normalisation layers).
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, masked: Iterable[tuple[torch.Tensor, torch.Tensor]]
    ) -> None:
        self.optimizer = optimizer
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        self._masked: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for i, (param, mask) in enumerate(masked):
            if id(param) not in owned:
                raise DPUConfigError(f"masked parameter #{i} is not managed by the optimizer")
            if mask.dtype != torch.bool or mask.shape != param.shape:
                raise DPUConfigError(
                    f"mask #{i} must be a bool tensor of shape {tuple(param.shape)}, "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            mask = mask.to(param.device)
            self._masked.append((param, mask, param.detach().clone()))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        if closure is not None:  # a closure would recompute gradients after our masking
            raise DPUConfigError("MaskedOptimizer.step does not support closures")
        for param, mask, _ in self._masked:
            if param.grad is not None:
                param.grad.masked_fill_(~mask, 0.0)
        self.optimizer.step()
        for param, mask, frozen in self._masked:
            param.copy_(torch.where(mask, param, frozen))
