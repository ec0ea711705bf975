"""How a weight tensor is cut into groups (thesis §2.6.2.1): each group is one vector w_g of
n weights that shares one set of binary bases B_g and coordinates α_g.

Structures (names as in the thesis):

- ``channelwise``: one group per output channel, ``w[c, ...]`` (fc rows; whole conv filters);
- ``subchannelwise(s)``: each output channel cut into ``s`` equal, contiguous parts;
- ``kernelwise``: one group per (output, input) kernel ``w[c, d, :, :]`` (conv only);
- ``pointwise``: one group per (output, kernel position) ``w[c, :, h, w]`` (conv only).

``to_groups`` gives a ``(G, n)`` view-copy, ``from_groups`` its exact inverse.
"""

from __future__ import annotations

import re

import torch

_SUB = re.compile(r"subchannelwise\((\d+)\)")


def check_structure(structure: str, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless ``structure`` can group a tensor of ``shape``."""
    if len(shape) < 2:
        raise ValueError(f"only tensors with >= 2 dims are quantised, got shape {shape}")
    if structure in ("kernelwise", "pointwise") and len(shape) != 4:
        raise ValueError(f"{structure} grouping needs a conv weight (4 dims), got shape {shape}")
    m = _SUB.fullmatch(structure)
    if m:
        s = int(m.group(1))
        per_row = int(torch.Size(shape[1:]).numel())
        if s < 1 or per_row % s:
            raise ValueError(f"{structure}: {per_row} weights per channel do not split in {s}")
    elif structure not in ("channelwise", "kernelwise", "pointwise"):
        raise ValueError(
            f"unknown grouping {structure!r}: channelwise, subchannelwise(s), kernelwise, pointwise"
        )


def to_groups(w: torch.Tensor, structure: str) -> torch.Tensor:
    """``(G, n)`` matrix of the groups of ``w`` (a copy)."""
    check_structure(structure, tuple(w.shape))
    out = w.shape[0]
    if structure == "channelwise":
        return w.reshape(out, -1).clone()
    if structure == "kernelwise":
        return w.reshape(out * w.shape[1], -1).clone()
    if structure == "pointwise":  # (c, d, h, w) -> (c, h, w, d)
        return w.permute(0, 2, 3, 1).reshape(-1, w.shape[1]).clone()
    m = _SUB.fullmatch(structure)
    assert m is not None
    return w.reshape(out * int(m.group(1)), -1).clone()


def from_groups(g: torch.Tensor, structure: str, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_groups`."""
    check_structure(structure, shape)
    if structure == "pointwise":
        c, d, h, w = shape
        return g.reshape(c, h, w, d).permute(0, 3, 1, 2).contiguous()
    return g.reshape(shape).contiguous()


def default_structure(shape: tuple[int, ...]) -> str:
    """The thesis's most used choice: pointwise for conv layers with >= 32 input channels,
    kernelwise for narrower convs, (sub)channelwise with groups of at most 512 for fc layers."""
    if len(shape) == 4:
        return "pointwise" if shape[1] >= 32 else "kernelwise"
    per_row = int(torch.Size(shape[1:]).numel())
    s = 1
    while per_row // s > 512 and per_row % (2 * s) == 0:
        s *= 2
    return "channelwise" if s == 1 else f"subchannelwise({s})"
