"""Error feedback for quantised updates: carry what the codec lost into the next round."""

from __future__ import annotations

from collections.abc import Mapping

import torch


@torch.no_grad()
def add_residual(
    target: Mapping[str, torch.Tensor],
    residual: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Return ``(intended, leftover)``: the target to encode this round and the residual to keep.

    The codec's residual is "intended minus what the device reconstructed". Adding it to the
    next target where that target is shipped anyway lets the error cancel over rounds. Inside
    partially-updated tensors only masked entries are shipped, so only they absorb the residual
    (adding it elsewhere would create extra non-zeros); the rest is returned as ``leftover`` and
    must be added to the codec's new residual. Tensors without a mask (dense ones) absorb all of
    their residual. Non-float tensors and names missing from ``residual`` pass through.
    """
    intended: dict[str, torch.Tensor] = {}
    leftover: dict[str, torch.Tensor] = {}
    for name, t in target.items():
        r = residual.get(name)
        if r is None or not t.is_floating_point():
            intended[name] = t.clone()
            continue
        r = r.to(t.device, t.dtype)
        m = None if mask is None else mask.get(name)
        if m is None:
            intended[name] = t + r
            leftover[name] = torch.zeros_like(r)
        else:
            m = m.to(t.device)
            intended[name] = torch.where(m, t + r, t)
            leftover[name] = torch.where(m, torch.zeros_like(r), r)
    return intended, leftover
