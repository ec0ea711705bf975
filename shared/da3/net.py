"""The DA³ network: a ``resnet`` backbone with one adaptor (DA³ or a baseline's) per block.

:class:`DA3Net` registers the backbone's own ``stem``, ``stages`` and ``head`` modules under
their names, so its state dict is the backbone's plus the ``da3.`` tensors, and a backbone
state (or a DPU diff of it) loads as it is. Which path a forward takes:

- *frozen backbone* (every method but fine-tuning): BatchNorm uses its running statistics
  (folded into the conv), convs run through :class:`~shared.da3.ops.FrozenConv` and ReLUs
  through :class:`~shared.da3.ops.PackedReLU`, so the backbone stores one bit per ReLU output
  for the backward and nothing else;
- *fine-tuning* (a backbone conv weight requires grad): the stock modules, BN in batch mode.

DA³ per block (``da3.blocks.<i>``): ``A`` = block input (at the block's output positions,
i.e. subsampled by its stride); ``z = G(H_s(A))`` with ``H_s(A) = [mean_c A, max_c A]`` and
G a k x k conv (2 -> 1); mask ``m`` = Gumbel-Sigmoid hard sample in training (Eq. 2-3, a
straight-through backward), ``sigmoid(beta z) > 0.5`` at inference (Eq. 1); block output
``relu(F(x) + shortcut(x) + m * (W * A + b))`` with ``W`` a k x k conv correction ([C_out,
C_in, k, k], zero at init so the adapted model starts as the backbone). At inference the correction is
computed only at the positions the mask keeps (:func:`~shared.da3.ops.sparse_correction`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from shared.da3.ops import (
    GateConv,
    GatedCorrection,
    GumbelGate,
    frozen_conv_bn,
    gumbel_noise_difference,
    packed_relu,
    sparse_correction,
)
from shared.da3.spec import PIGGYBACK_INIT, PIGGYBACK_THRESHOLD, DA3Spec
from shared.models.spec import ArchSpec, conv4_input_shape, resnet_stride
from shared.models.zoo import BasicBlock


@dataclass(frozen=True)
class BlockShape:
    index: int  # block number over all stages
    name: str  # "stages.<s>.<b>"
    c_in: int
    c_out: int
    stride: int
    h_in: int
    w_in: int
    h_out: int
    w_out: int
    projection: bool  # 1x1 conv shortcut


def block_shapes(arch: ArchSpec) -> list[BlockShape]:
    """Every basic block of a ``resnet`` spec with its widths and feature-map sizes."""
    c, h, w = conv4_input_shape(arch)
    c = arch.channels[0]
    out: list[BlockShape] = []
    for s, (width, blocks) in enumerate(zip(arch.channels, arch.hidden, strict=True)):
        for b in range(blocks):
            stride = resnet_stride(s, b)
            ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
            out.append(BlockShape(len(out), f"stages.{s}.{b}", c, width, stride, h, w, ho, wo,
                                  stride != 1 or c != width))  # fmt: skip
            c, h, w = width, ho, wo
    return out


def backbone_convs(arch: ArchSpec) -> list[str]:
    """Module names of the backbone's convs (Piggyback masks one score tensor per conv)."""
    names = ["stem.0"]
    for blk in block_shapes(arch):
        names += [f"{blk.name}.conv1", f"{blk.name}.conv2"] + ([f"{blk.name}.down.0"] if blk.projection else [])
    return names


def score_key(conv_name: str) -> str:
    return conv_name.replace(".", "_")


class DA3Adaptor(nn.Module):
    def __init__(self, blk: BlockShape, kernel: int, gate: bool, correction_kernel: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(blk.c_out, blk.c_in, correction_kernel, correction_kernel))
        self.bias = nn.Parameter(torch.zeros(blk.c_out))
        self.gate = nn.Conv2d(2, 1, kernel, padding=kernel // 2) if gate else None


class LiteResidual(nn.Module):
    """TinyTL's lite residual module (Cai et al. 2020) for one block: 2x average pooling, a
    group 3x3 conv, ReLU, a 1x1 projection (zero at init), upsampling to the block's output."""

    def __init__(self, blk: BlockShape, group_width: int) -> None:
        super().__init__()
        groups = max(1, blk.c_in // group_width)
        while blk.c_in % groups:
            groups -= 1
        self.conv = nn.Conv2d(blk.c_in, blk.c_in, 3, padding=1, groups=groups, bias=False)
        self.proj = nn.Conv2d(blk.c_in, blk.c_out, 1)


class ResidualAdapters(nn.Module):
    """Residual adapters (Rebuffi et al.): a 1x1 conv per block conv, in series (after the
    conv: ``y + a(y)``) or in parallel (beside it, on the conv's input); zero at init."""

    def __init__(self, blk: BlockShape, parallel: bool) -> None:
        super().__init__()
        self.a1 = nn.Conv2d(blk.c_in if parallel else blk.c_out, blk.c_out, 1, stride=blk.stride if parallel else 1, bias=False)
        self.a2 = nn.Conv2d(blk.c_out, blk.c_out, 1, bias=False)


class DA3Modules(nn.Module):
    """Everything the family adds (the ``da3.`` state-dict entries)."""

    def __init__(self, arch: ArchSpec, spec: DA3Spec) -> None:
        super().__init__()
        shapes = block_shapes(arch)
        self.blocks = nn.ModuleList()
        self.scores = nn.ParameterDict()
        if spec.adaptor == "da3":
            self.blocks.extend(DA3Adaptor(b, spec.gate_kernel, spec.gate, spec.correction_kernel) for b in shapes)
        elif spec.adaptor == "tinytl":
            self.blocks.extend(LiteResidual(b, spec.lite_groups_width) for b in shapes)
        elif spec.adaptor in ("series", "parallel"):
            self.blocks.extend(ResidualAdapters(b, spec.adaptor == "parallel") for b in shapes)
        elif spec.adaptor == "piggyback":
            c_in = conv4_input_shape(arch)[0]
            shapes_by_name = {"stem.0": (arch.channels[0], c_in, 3, 3)}
            for b in shapes:
                shapes_by_name[f"{b.name}.conv1"] = (b.c_out, b.c_in, 3, 3)
                shapes_by_name[f"{b.name}.conv2"] = (b.c_out, b.c_out, 3, 3)
                if b.projection:
                    shapes_by_name[f"{b.name}.down.0"] = (b.c_out, b.c_in, 1, 1)
            for name in backbone_convs(arch):
                self.scores[score_key(name)] = nn.Parameter(torch.full(shapes_by_name[name], PIGGYBACK_INIT))


@dataclass
class GateStats:
    """Per-block counts of an inference pass (reset by :meth:`DA3Net.reset_stats`)."""

    active: list[int] = field(default_factory=list)  # positions whose correction was computed
    positions: list[int] = field(default_factory=list)  # all output positions
    samples: int = 0


class DA3Net(nn.Module):
    def __init__(self, backbone: nn.Module, arch: ArchSpec, spec: DA3Spec) -> None:
        super().__init__()
        stem, stages, head = backbone.stem, backbone.stages, backbone.head
        assert isinstance(stem, nn.Sequential) and isinstance(stages, nn.Sequential) and isinstance(head, nn.Linear)
        self.stem, self.stages, self.head = stem, stages, head
        self.da3 = DA3Modules(arch, spec)
        self.section = spec
        self.shapes = block_shapes(arch)
        self.temperature = spec.temperature  # train_domain may override it (and anneal it)
        self.beta = spec.beta  # Eq. (1)'s beta in training; train_domain may anneal it
        self.dense = False  # evaluate_domain(gated=False): apply the correction everywhere
        self.generator: torch.Generator | None = None  # Gumbel noise in training
        self.densities: list[torch.Tensor] = []  # training: per-block mean of the hard mask
        self.stats = GateStats([0] * len(self.shapes), [0] * len(self.shapes))

    def reset_stats(self) -> None:
        self.stats = GateStats([0] * len(self.shapes), [0] * len(self.shapes))

    def blocks(self) -> list[BasicBlock]:
        return [blk for stage in self.stages for blk in stage if isinstance(blk, BasicBlock)]  # type: ignore[attr-defined]

    def _finetuning(self) -> bool:
        return any(p.requires_grad for n, p in self.named_parameters()
                   if not n.startswith(("da3.", "head.")) and not n.endswith("bias"))  # fmt: skip

    def _conv_bn(self, x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d, name: str, lean: bool) -> torch.Tensor:
        if self.section.adaptor == "piggyback":
            scores = self.da3.scores[score_key(name)]
            hard = (scores > PIGGYBACK_THRESHOLD).to(scores.dtype)
            mask = hard + scores - scores.detach() if scores.requires_grad else hard  # straight-through
            assert bn.running_var is not None and bn.running_mean is not None
            with torch.no_grad():
                scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                w = conv.weight * scale.view(-1, 1, 1, 1)
            out = F.conv2d(x, w * mask, None, conv.stride, conv.padding)
            return out + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1)
        if lean:
            return frozen_conv_bn(x, conv, bn)
        return bn(conv(x))

    def _relu(self, x: torch.Tensor, lean: bool) -> torch.Tensor:
        return packed_relu(x) if lean else torch.relu(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        lean = not self._finetuning()
        self.densities = []
        if not self.training:
            self.stats.samples += x.shape[0]
        stem_conv, stem_bn = self.stem[0], self.stem[1]
        assert isinstance(stem_conv, nn.Conv2d) and isinstance(stem_bn, nn.BatchNorm2d)
        h = self._relu(self._conv_bn(x, stem_conv, stem_bn, "stem.0", lean), lean)
        for shape, blk in zip(self.shapes, self.blocks(), strict=True):
            h = self._block(shape, blk, h, lean)
        return self.head(h.mean(dim=(2, 3)))

    def _block(self, s: BlockShape, blk: BasicBlock, x: torch.Tensor, lean: bool) -> torch.Tensor:
        kind = self.section.adaptor
        mod = self.da3.blocks[s.index] if len(self.da3.blocks) else None
        h = self._conv_bn(x, blk.conv1, blk.bn1, f"{s.name}.conv1", lean)
        if kind == "series":
            h = h + mod.a1(h)  # type: ignore[union-attr,operator]
        elif kind == "parallel":
            h = h + mod.a1(x)  # type: ignore[union-attr,operator]
        h = self._relu(h, lean)
        out = self._conv_bn(h, blk.conv2, blk.bn2, f"{s.name}.conv2", lean)
        if kind == "series":
            out = out + mod.a2(out)  # type: ignore[union-attr,operator]
        elif kind == "parallel":
            out = out + mod.a2(h)  # type: ignore[union-attr,operator]
        if blk.down is not None:
            out = out + self._conv_bn(x, blk.down[0], blk.down[1], f"{s.name}.down.0", lean)  # type: ignore[arg-type]
        else:
            out = out + x
        if kind == "da3":
            out = out + self._correction(s, mod, x)  # type: ignore[arg-type]
        elif kind == "tinytl":
            out = out + self._lite(s, mod, x)  # type: ignore[arg-type]
        return self._relu(out, lean)

    def gate_logits(self, mod: DA3Adaptor, a: torch.Tensor) -> torch.Tensor:
        """``G(H_s(A))`` (N, 1, H, W): the channel-pooled map [mean_c, max_c] of ``A`` through
        the k x k conv G. ``A`` enters detached: the gate learns through G only, so the
        backbone features need no extra storage for it (docs/da3.md)."""
        assert mod.gate is not None
        a = a.detach()
        pooled = torch.cat([a.mean(dim=1, keepdim=True), a.amax(dim=1, keepdim=True)], dim=1)
        if torch.is_grad_enabled() and mod.gate.weight.requires_grad:
            return GateConv.apply(pooled, mod.gate.weight, mod.gate.bias)
        return mod.gate(pooled)

    def _correction(self, s: BlockShape, mod: DA3Adaptor, x: torch.Tensor) -> torch.Tensor:
        a = x[:, :, :: s.stride, :: s.stride].contiguous() if s.stride > 1 else x
        n, _, h, w = a.shape
        train_grad = torch.is_grad_enabled() and mod.weight.requires_grad
        if mod.gate is None or (self.dense and not self.training):
            m = a.new_ones(n, 1, h, w)
        elif self.training:
            z = self.gate_logits(mod, a)
            noise = gumbel_noise_difference(z.shape, self.generator).to(z.device)
            m = GumbelGate.apply(z, noise, self.beta, self.temperature)
        else:
            m = (self.gate_logits(mod, a) > 0).to(a.dtype)  # sigmoid(beta z) > 0.5, beta > 0
        if self.training:
            self.densities.append(m.mean())
        if train_grad:
            return GatedCorrection.apply(a, m, mod.weight, mod.bias, self.section.store_bits)
        if not self.training:
            self.stats.active[s.index] += int((m > 0.5).sum())
            self.stats.positions[s.index] += n * h * w
        return sparse_correction(a, m, mod.weight, mod.bias)

    def _lite(self, s: BlockShape, mod: LiteResidual, x: torch.Tensor) -> torch.Tensor:
        p = F.avg_pool2d(x, 2) if min(x.shape[-2:]) >= 2 else x
        y = mod.proj(torch.relu(mod.conv(p)))
        if y.shape[-2:] != (s.h_out, s.w_out):
            y = F.interpolate(y, size=(s.h_out, s.w_out), mode="nearest")
        return y
