"""Running a multi-bit model: three ways to execute ŵ = B α, measured against each other by
``bench/alq.py`` (bytes resident and time per forward pass).

- ``expanded``: ŵ rebuilt once as float32 and cached; plain ``F.linear`` / ``F.conv2d``.
  Fastest, but holds 4 bytes per weight.
- ``packed``: only bit planes stay resident (the packed bases, rearranged to one slot per
  basis index: a group narrower than the widest keeps zero bits in its spare slots, so this
  is at most K_max / I_avg times the storage format) and float32 α; every forward pass
  unpacks the bits and rebuilds ŵ, then runs the dense op.
- ``bitplane`` (fc layers with (sub)channelwise groups): y = Σ_i α_i ⊙ (B_i x), the bases as
  ±1 planes, without ever forming ŵ (the form bitwise xnor/popcount kernels compute; here the
  planes are unpacked per call, as torch has no popcount matmul).

All three give the same result up to float rounding (``tests/shared/test_alq.py``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.alq.groups import from_groups
from shared.alq.storage import PackedTensor, expand, unpack

MODES = ("expanded", "packed", "bitplane")


_SHIFTS = torch.arange(7, -1, -1, dtype=torch.uint8)


def _slot_layout(pt: PackedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed bases rearranged once for fast unpacking: bit planes ``(G, K, ⌈n/8⌉)`` uint8
    (K = the widest group; narrower groups' spare slots are zero bits with α = 0) and α
    ``(G, K)`` float32."""
    mb = unpack(pt)
    bits = (mb.B > 0).numpy()
    planes = np.packbits(bits, axis=2)  # (G, K, ceil(n/8))
    return torch.from_numpy(planes), (mb.alpha * mb.active).float()


def _unpack_planes(planes: torch.Tensor, n: int) -> torch.Tensor:
    """(G, K, ⌈n/8⌉) uint8 -> (G, K, n) float32 ±1, in torch (no numpy round trip)."""
    b = (planes.unsqueeze(-1) >> _SHIFTS) & 1
    return b.reshape(*planes.shape[:2], -1)[..., :n].float() * 2 - 1


class MultiBitOp(nn.Module):
    """One conv or fc layer whose weight is a packed multi-bit tensor."""

    def __init__(self, layer: nn.Linear | nn.Conv2d, pt: PackedTensor, mode: str) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "bitplane" and not (isinstance(layer, nn.Linear)
                                       and pt.structure.startswith(("channelwise", "subchannelwise"))):
            raise ValueError("the bitplane runner needs an fc layer with (sub)channelwise groups")
        self.mode, self.pt, self.is_conv = mode, pt, isinstance(layer, nn.Conv2d)
        self.conv_args: dict[str, Any] = dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                              groups=layer.groups) if isinstance(layer, nn.Conv2d) else {}  # fmt: skip
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                                 requires_grad=False)  # fmt: skip
        self.weight = expand(pt) if mode == "expanded" else None
        self.planes: torch.Tensor | None = None
        self.alpha: torch.Tensor | None = None
        if mode != "expanded":
            self.planes, self.alpha = _slot_layout(pt)

    def resident_bytes(self) -> int:
        """Bytes this layer keeps between calls for its weight (the runner's α are float32)."""
        if self.weight is not None:
            return self.weight.numel() * 4
        assert self.planes is not None and self.alpha is not None
        return self.planes.numel() + 4 * self.alpha.numel()

    def _grouped(self) -> torch.Tensor:
        assert self.planes is not None and self.alpha is not None
        B = _unpack_planes(self.planes, self.pt.group_size)
        return torch.bmm(self.alpha.unsqueeze(1), B).squeeze(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "bitplane":
            assert self.planes is not None and self.alpha is not None
            B, alpha = _unpack_planes(self.planes, self.pt.group_size), self.alpha  # G = out * s
            out = self.pt.shape[0]
            s = B.shape[0] // out
            xs = x.reshape(x.shape[0], s, -1)  # (b, s, n)
            # z[b, o, s, k] = B[o, s, k, :] . x[b, s, :]; y = Σ_{s,k} α[o, s, k] z
            Bv = B.reshape(out, s, B.shape[1], -1)
            z = torch.einsum("bsn,oskn->bosk", xs, Bv)
            y = (z * alpha.reshape(out, s, -1)).sum(dim=(2, 3))
            return y if self.bias is None else y + self.bias
        w = self.weight if self.weight is not None else \
            from_groups(self._grouped(), self.pt.structure, self.pt.shape)  # fmt: skip
        if self.is_conv:
            return F.conv2d(x, w, self.bias, **self.conv_args)
        return F.linear(x, w, self.bias)


def build_runner(model: nn.Module, packed: dict[str, PackedTensor], mode: str) -> nn.Module:
    """A copy-free wrapper: ``model`` with every packed layer replaced by a :class:`MultiBitOp`.
    ``bitplane`` falls back to ``packed`` for layers it cannot run (convolutions)."""
    import copy

    runner = copy.deepcopy(model)
    for name in packed:
        mod_name = name.rsplit(".", 1)[0]
        parent_name, _, child = mod_name.rpartition(".")
        parent = runner.get_submodule(parent_name) if parent_name else runner
        layer = runner.get_submodule(mod_name)
        assert isinstance(layer, nn.Linear | nn.Conv2d)
        m = mode
        if mode == "bitplane" and not (isinstance(layer, nn.Linear)
                                       and packed[name].structure.startswith(("channelwise", "subchannelwise"))):
            m = "packed"
        setattr(parent, child, MultiBitOp(layer, packed[name], m))
    return runner.eval()


def resident_weight_bytes(runner: nn.Module) -> int:
    return sum(m.resident_bytes() for m in runner.modules() if isinstance(m, MultiBitOp))
