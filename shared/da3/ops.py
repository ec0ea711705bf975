"""The autograd pieces that keep DA³'s backward small (docs/da3.md, "Memory accounting").

Stock PyTorch saves every conv's input and every ReLU's float output even when the conv's
weight is frozen. With a frozen weight only the *input* gradient is needed, and that needs the
weight alone; a ReLU's input gradient needs only the sign of its output. So:

- :class:`FrozenConv` saves nothing (it keeps references to the frozen module, whose weight
  and BatchNorm statistics are resident anyway, and re-folds them in the backward);
- :class:`PackedReLU` saves its mask bit-packed (1 bit per element, 1/32 of the float);
- :class:`GumbelGate` is supplementary Eq. (1)-(3) with the hard 0.5 threshold in the forward
  and the straight-through gradient of the relaxed sample in the backward;
- :class:`GatedCorrection` is the gated 1x1 correction ``m * (W x + b)``; it saves ``x`` (for
  ``dW``) and the packed mask, and recomputes ``W x + b`` in the backward for the gate.

Every saved tensor goes through ``ctx.save_for_backward``, so a ``saved_tensors_hooks``
counter sees all of them (shared/da3/memory.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.grad import conv2d_input, conv2d_weight

_BITS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as uint8, 8 elements per byte (C order, zero-padded)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return (flat.view(-1, 8).to(torch.uint8) * _BITS.to(flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    n = 1
    for d in shape:
        n *= int(d)
    bits = (packed.unsqueeze(1) & _BITS.to(packed.device)) != 0
    return bits.reshape(-1)[:n].reshape(shape)


def folded(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Conv weight scaled by the frozen BN's ``weight / sqrt(var + eps)`` (no grad) and the BN
    scale, so that ``bn_eval(conv(x)) = conv_{W'}(x) + (bn.bias - mean * scale)``."""
    with torch.no_grad():
        assert bn.running_var is not None and bn.running_mean is not None
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        return conv.weight * scale.view(-1, 1, 1, 1), scale


def bn_shift(bn: nn.BatchNorm2d, scale: torch.Tensor) -> torch.Tensor:
    """``bn.bias - running_mean * scale``: differentiable in ``bn.bias`` (bias-only methods),
    and its backward saves nothing (a subtraction of a constant)."""
    assert bn.running_mean is not None
    return bn.bias - bn.running_mean * scale


class FrozenConv(torch.autograd.Function):
    """``conv_{W'}(x)`` for a frozen conv + eval-mode BN pair; saves no tensor."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        weight, _ = folded(conv, bn)
        ctx.conv, ctx.bn, ctx.in_shape = conv, bn, x.shape
        return F.conv2d(x, weight, None, conv.stride, conv.padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        weight, _ = folded(ctx.conv, ctx.bn)  # recomputed: the weight is resident anyway
        gx = conv2d_input(ctx.in_shape, weight, grad, ctx.conv.stride, ctx.conv.padding)
        return gx, None, None


def frozen_conv_bn(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    """eval-mode ``bn(conv(x))`` with frozen conv weights: nothing saved for the backward; the
    BN shift is differentiable when ``bn.bias`` trains (bias-only / TinyTL)."""
    _, scale = folded(conv, bn)
    out = FrozenConv.apply(x, conv, bn)
    return out + bn_shift(bn, scale).view(1, -1, 1, 1)


class PackedReLU(torch.autograd.Function):
    """ReLU whose backward keeps one bit per element."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        out = x.clamp_min(0)
        if ctx.needs_input_grad[0]:
            ctx.shape = out.shape
            ctx.save_for_backward(pack_bits(out > 0))
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, ctx.shape)


def packed_relu(x: torch.Tensor) -> torch.Tensor:
    return PackedReLU.apply(x) if x.requires_grad else torch.relu(x)


class GumbelGate(torch.autograd.Function):
    """Supplementary Eq. (1)-(3) in training: ``pi0 = sigmoid(beta z)`` (Eq. 1), the
    Gumbel-Sigmoid sample ``p = sigmoid((log pi0 - log(1 - pi0) + g0 - g1) / T) =
    sigmoid((beta z + g0 - g1) / T)`` (Eq. 2-3 with the second class's probability 1 - pi0:
    the literal Eq. 2 gives that class logit 0, which caps P(open) at pi0 / (1 + pi0) < 1/2
    and contradicts the inference rule ``pi0 > 0.5``; see docs/da3.md),
    forward ``G^b = [p > 0.5]``, backward the straight-through estimate ``dG^b/dz := dp/dz =
    p (1 - p) beta / T``. ``noise`` is ``g0 - g1``. Saves that one factor per
    position as bfloat16 (a gradient scale in [0, beta / 4T]: 8 bits of mantissa suffice), all
    the backward needs."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, noise: torch.Tensor, beta: float, temperature: float) -> torch.Tensor:
        p = torch.sigmoid((beta * z + noise) / temperature)  # P(p > 0.5) = pi0
        ctx.save_for_backward((p * (1 - p) * (beta / temperature)).to(torch.bfloat16))
        return (p > 0.5).to(z.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (factor,) = ctx.saved_tensors
        return grad * factor.to(grad.dtype), None, None, None


def gumbel_noise_difference(shape: torch.Size, generator: torch.Generator | None = None) -> torch.Tensor:
    """``g0 - g1`` for two independent standard Gumbel samples (``g = -log(-log u)``)."""
    u = torch.rand((2, *shape), generator=generator).clamp_(1e-10, 1 - 1e-7)
    g = -torch.log(-torch.log(u))
    return g[0] - g[1]


def quantize_channels(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [N, C, H, W] as int8 with one float32 scale per channel (max-abs / 127)."""
    scale = x.detach().abs().amax(dim=(0, 2, 3)).clamp_min(1e-12) / 127.0
    q = torch.round(x.detach() / scale.view(1, -1, 1, 1)).clamp_(-127, 127).to(torch.int8)
    return q, scale


def dequantize_channels(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return q.to(scale.dtype) * scale.view(1, -1, 1, 1)


class GateConv(torch.autograd.Function):
    """G: ``conv2d(H_s(A), w, b)`` on the pooled map, which enters detached (no input
    gradient). Saves the map as int8 with a per-channel scale for G's weight gradient."""

    @staticmethod
    def forward(ctx: Any, pooled: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.padding = weight.shape[-1] // 2
        ctx.save_for_backward(weight, *quantize_channels(pooled))
        return F.conv2d(pooled, weight, bias, padding=ctx.padding)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor | None, torch.Tensor | None]:
        weight, q, scale = ctx.saved_tensors
        gw = conv2d_weight(dequantize_channels(q, scale), weight.shape, grad, padding=ctx.padding) if ctx.needs_input_grad[1] else None
        gb = grad.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[2] else None
        return None, gw, gb


def _conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The correction ``W * x + b``: a k x k convolution (odd k, same-size output)."""
    return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2)


class GatedCorrection(torch.autograd.Function):
    """``m * (W * x + b)`` for a k x k correction ``W`` ([C_out, C_in, k, k]) on ``x`` ([N, C_in, H, W])
    and a binary mask ``m`` ([N, 1, H, W]). Saves ``x`` (float32, or with ``bits=8`` as int8
    plus a per-channel scale: the weight and gate gradients then use the dequantised ``x``) and
    ``m`` packed to bits; the gate's gradient ``sum_c g * (W x + b)`` is recomputed in the
    backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, m: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                bits: int = 32) -> torch.Tensor:
        ctx.m_shape, ctx.bits = m.shape, bits
        stored = quantize_channels(x) if bits == 8 else (x,)
        ctx.save_for_backward(pack_bits(m > 0.5), weight, bias, *stored)
        return m * _conv(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        packed, weight, bias, *stored = ctx.saved_tensors
        x = dequantize_channels(stored[0], stored[1]) if ctx.bits == 8 else stored[0]
        m = unpack_bits(packed, ctx.m_shape).to(grad.dtype)
        gm = grad * m
        pad = weight.shape[-1] // 2
        gx = conv2d_input(x.shape, weight, gm, padding=pad) if ctx.needs_input_grad[0] else None
        gmask = None
        if ctx.needs_input_grad[1]:
            gmask = (grad * _conv(x, weight, bias)).sum(dim=1, keepdim=True)
        gw = conv2d_weight(x, weight.shape, gm, padding=pad) if ctx.needs_input_grad[2] else None
        gb = gm.sum(dim=(0, 2, 3)) if ctx.needs_input_grad[3] else None
        return gx, gmask, gw, gb, None


def sparse_correction(x: torch.Tensor, m: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Inference: ``m * (W * x + b)`` computed only at the positions where ``m`` is 1: gather
    their k x k input patches, one matmul, scatter into a zero output. Equals the masked dense
    computation."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    if k == 1:
        rows = x.permute(0, 2, 3, 1).reshape(-1, c)
    else:  # patches [N, C*k*k, H*W] -> one row per position
        rows = F.unfold(x, k, padding=k // 2).transpose(1, 2).reshape(-1, c * k * k)
    active = torch.nonzero(m.reshape(-1) > 0.5).squeeze(1)
    out = x.new_zeros(n * h * w, weight.shape[0])
    if active.numel():
        out.index_copy_(0, active, torch.addmm(bias, rows.index_select(0, active), weight.reshape(weight.shape[0], -1).t()))
    return out.view(n, h, w, -1).permute(0, 3, 1, 2)
