"""Run-time cost of one nonzero weight per layer, for the "latency" allocation mode.

A conv weight is applied at every output position, an fc weight once per sample, so one
nonzero costs ``H_out * W_out`` multiply-adds in a conv and 1 in an fc layer: the FLOP proxy of
:func:`shared.dress.sampling.allocate_sparsity`'s ``mode="latency"``. Shapes are propagated
statically through a plain sequence of convs, pools, norms, activations, flattens and fcs; any
other layout (residual blocks, say) is priced by one forward pass with hooks instead. (The
static walk exists because the first forward on the meta device costs ~18 s of torch set-up.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from shared.dress.layers import DressError, sparse_layers

_PASS = (nn.modules.batchnorm._NormBase, nn.ReLU, nn.Dropout, nn.Identity)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[-1]))


def _static_costs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float] | None:
    """Costs by shape propagation over the leaf modules in order; None if the model is not a
    plain sequence this walk understands."""
    shape = tuple(int(d) for d in input_shape)
    costs: dict[str, float] = {}
    for name, m in model.named_modules():
        if len(list(m.children())):
            continue
        if isinstance(m, nn.Conv2d):
            if len(shape) != 3 or shape[0] != m.in_channels or isinstance(m.padding, str):
                return None
            hw = []
            for i in range(2):
                k, s, p, d = (_pair(a)[i] for a in (m.kernel_size, m.stride, m.padding, m.dilation))
                hw.append((shape[1 + i] + 2 * p - d * (k - 1) - 1) // s + 1)
            shape = (m.out_channels, hw[0], hw[1])
            costs[name] = float(hw[0] * hw[1])
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            if len(shape) != 3 or getattr(m, "ceil_mode", False):
                return None
            pk, ps = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
            pp, pd = _pair(m.padding), _pair(getattr(m, "dilation", 1))
            shape = (shape[0],) + tuple(
                (shape[1 + i] + 2 * pp[i] - pd[i] * (pk[i] - 1) - 1) // ps[i] + 1 for i in range(2)
            )
        elif isinstance(m, nn.Flatten):
            shape = (int(torch.Size(shape).numel()),)
        elif isinstance(m, nn.Linear):
            if shape != (m.in_features,):
                return None
            shape = (m.out_features,)
            costs[name] = 1.0
        elif not isinstance(m, _PASS):
            return None
    return costs


@torch.no_grad()
def layer_costs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, float]:
    """``{layer: MACs per nonzero weight at batch 1}`` for every sparse layer of ``model``."""
    names = {layer.name for layer in sparse_layers(model)}
    static = _static_costs(model, input_shape)
    if static is not None and set(static) == names:
        return static
    costs: dict[str, float] = {}
    hooks = []
    for name, module in model.named_modules():
        if name not in names:
            continue

        def record(mod: nn.Module, args: object, out: torch.Tensor, name: str = name) -> None:
            costs[name] = float(out[0, 0].numel()) if isinstance(mod, nn.Conv2d) else 1.0

        hooks.append(module.register_forward_hook(record))
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    try:
        model.eval()  # no running-statistics update from the probe
        model(torch.zeros(1, *input_shape, device=device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if set(costs) != names:
        raise DressError(f"layers {sorted(names - set(costs))} were not reached by a forward pass")
    return costs
