"""Autograd functions for on-device adaptation that save only what the weight gradients need.

Each function computes the dense forward and the dense input gradient (Fig. 4.4: neither the
forward path nor g(x_{l-1}) is sparsified), but decides itself what it keeps between the two:

* a layer whose weights do not step (α_l^k = 0: its weight and bias do not require grad) saves
  no input and computes no weight gradient (§4.4.2.2);
* a stepping conv layer with meta attention computes γ^fw from x_{l-1} in the forward pass and
  saves only the channels γ^fw selects, already scaled (γ^fw · x_{l-1}, §4.4.3.2); in backward
  it computes γ^bw from g(y_l) and the weight gradient from the two sparse tensors, which equals
  the masked dense gradient γ_l ⊙ g(w_l) of Eq. 4.14;
* ReLU and the 2x2 max-pool are fused and keep 4 bits per pooled output (2 bits: which of the 4
  inputs won; 1 bit: whether it was positive), the 1/T terms of Eq. 4.19;
* group normalisation must keep its normalised input whenever the gradient has to flow through
  it to an earlier layer (its input gradient needs it), a cost Eq. 4.19 omits ("we omit ...
  normalization layers"); when nothing earlier steps it keeps only the selected channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd import Function
from torch.nn.grad import conv2d_input, conv2d_weight

from shared.pmeta.attention import attention_score

GN_EPS = 1e-5  # nn.GroupNorm's default, which the conv4 backbone uses
AttParams = tuple[torch.Tensor, torch.Tensor] | None


class LayerStats:
    """Kept-channel fractions of one forward/backward pass, per layer (for Eq. 4.19/4.21)."""

    def __init__(self) -> None:
        self.mu_fw: dict[int, float] = {}
        self.mu_bw: dict[int, float] = {}


def _select(t: torch.Tensor, att: AttParams, rho: float, stats: dict[int, float], index: int
            ) -> tuple[torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(γ^fw, kept channel indices) of t, or (None, None) without attention."""
    if att is None:
        stats[index] = 1.0
        return None, None
    gamma = attention_score(t, att[0], att[1], rho)
    keep = torch.nonzero(gamma).flatten()
    stats[index] = keep.numel() / gamma.numel()
    return gamma, keep


def _bw_scale(gy: torch.Tensor, att: AttParams, rho: float, stats: dict[int, float], index: int) -> torch.Tensor:
    if att is None:
        stats[index] = 1.0
        return gy
    gamma = attention_score(gy, att[0], att[1], rho)
    stats[index] = float((gamma > 0).float().mean())
    return gy * gamma.view(1, -1, *([1] * (gy.dim() - 2)))


class SparseConv(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, index: int, att_fw: AttParams,
                att_bw: AttParams, rho_fw: float, rho_bw: float, stats: LayerStats) -> torch.Tensor:  # fmt: skip
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.meta = (x.shape, w.shape, index, att_bw, rho_bw, stats)
        xs, keep = None, None
        if need_w:
            gamma, keep = _select(x, att_fw, rho_fw, stats.mu_fw, index)
            xs = x if keep is None else x.index_select(1, keep) * gamma[keep].view(1, -1, 1, 1)  # type: ignore[index]
        ctx.keep = keep
        ctx.save_for_backward(xs, w if need_x else None)
        return F.conv2d(x, w, b, padding=1)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xs, w = ctx.saved_tensors
        x_shape, w_shape, index, att_bw, rho_bw, stats = ctx.meta
        gx = conv2d_input(x_shape, w, gy, padding=1) if ctx.needs_input_grad[0] else None
        gw = gb = None
        if ctx.needs_input_grad[1]:
            g = _bw_scale(gy, att_bw, rho_bw, stats.mu_bw, index)
            gb = g.sum((0, 2, 3))
            if ctx.keep is None:
                gw = conv2d_weight(xs, w_shape, g, padding=1)
            else:  # only the kept input channels' gradients are computed
                gw = gy.new_zeros(w_shape)
                if ctx.keep.numel():
                    shape = (w_shape[0], int(ctx.keep.numel()), *w_shape[2:])
                    gw[:, ctx.keep] = conv2d_weight(xs, shape, g, padding=1)
        return gx, gw, gb, None, None, None, None, None, None


class SparseGroupNorm(Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, index: int, groups: int,
                att_fw: AttParams, att_bw: AttParams, rho_fw: float, rho_bw: float,
                stats: LayerStats) -> torch.Tensor:  # fmt: skip
        n, c = x.shape[:2]
        xg = x.reshape(n, groups, -1)
        mean = xg.mean(-1, keepdim=True)
        rstd = (xg - mean).pow(2).mean(-1, keepdim=True).add(GN_EPS).rsqrt()  # (n, G, 1)
        xhat = ((xg - mean) * rstd).reshape(x.shape)
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gamma, keep = _select(xhat, att_fw, rho_fw, stats.mu_fw, index) if need_w else (None, None)
        ctx.meta = (index, groups, att_bw, rho_bw, stats, gamma, keep)
        if need_x:  # the input gradient needs all of x̂ (and the weight gradient reuses it)
            ctx.save_for_backward(xhat, rstd, w)
        elif need_w:
            xs = xhat if keep is None else xhat.index_select(1, keep) * gamma[keep].view(1, -1, 1, 1)  # type: ignore[index]
            ctx.save_for_backward(xs, None, None)
        else:
            ctx.save_for_backward(None, None, None)
        return xhat * w.view(1, c, 1, 1) + b.view(1, c, 1, 1)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved, rstd, w = ctx.saved_tensors
        index, groups, att_bw, rho_bw, stats, gamma, keep = ctx.meta
        n, c = gy.shape[:2]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gxh = (gy * w.view(1, c, 1, 1)).reshape(n, groups, -1)
            xh = saved.reshape(n, groups, -1)
            gx = (rstd * (gxh - gxh.mean(-1, keepdim=True) - xh * (gxh * xh).mean(-1, keepdim=True))).reshape(gy.shape)
        if ctx.needs_input_grad[1]:
            g = _bw_scale(gy, att_bw, rho_bw, stats.mu_bw, index)
            gb = g.sum((0, 2, 3))
            gw = gy.new_zeros(c)
            if ctx.needs_input_grad[0]:  # full x̂ at hand: scale by γ^fw (zeros drop channels)
                prod = (g * saved).sum((0, 2, 3))
                gw = prod if gamma is None else prod * gamma
            elif keep is None:
                gw = (g * saved).sum((0, 2, 3))
            elif keep.numel():
                gw[keep] = (g.index_select(1, keep) * saved).sum((0, 2, 3))
        return gx, gw, gb, None, None, None, None, None, None, None


def _pack_nibbles(v: torch.Tensor) -> torch.Tensor:
    flat = v.flatten()
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return flat[0::2] | (flat[1::2] << 4)


def _unpack_nibbles(p: torch.Tensor, count: int) -> torch.Tensor:
    return torch.stack([p & 15, p >> 4], 1).flatten()[:count]


class ReluMaxPool(Function):
    """relu then 2x2 max-pool (= max-pool then relu), keeping 4 bits per output for backward."""

    @staticmethod
    def forward(ctx: Any, y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = y.shape
        ho, wo = h // 2, w // 2
        win = y[:, :, : 2 * ho, : 2 * wo].reshape(n, c, ho, 2, wo, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, ho, wo, 4)
        top, code = win.max(-1)
        ctx.shape = (n, c, h, w)
        if ctx.needs_input_grad[0]:
            nib = code.to(torch.uint8) | ((top > 0).to(torch.uint8) << 2)
            ctx.save_for_backward(_pack_nibbles(nib))
        return top.clamp_min(0.0)

    @staticmethod
    def backward(ctx: Any, go: torch.Tensor) -> torch.Tensor:
        (packed,) = ctx.saved_tensors
        n, c, h, w = ctx.shape
        ho, wo = h // 2, w // 2
        nib = _unpack_nibbles(packed, n * c * ho * wo).reshape(n, c, ho, wo)
        g = go * (nib >> 2).to(go.dtype)
        win = go.new_zeros(n, c, ho, wo, 4).scatter_(-1, (nib & 3).long().unsqueeze(-1), g.unsqueeze(-1))
        gin = win.reshape(n, c, ho, wo, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, c, 2 * ho, 2 * wo)
        return F.pad(gin, (0, w - 2 * wo, 0, h - 2 * ho))


class SparseLinear(Function):
    """The output layer (no meta attention, §4.6.1): saves x only when its weights step."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, w if ctx.needs_input_grad[0] else None)
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, w = ctx.saved_tensors
        gx = gy @ w if ctx.needs_input_grad[0] else None
        gw = gy.t() @ x if ctx.needs_input_grad[1] else None
        gb = gy.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb
