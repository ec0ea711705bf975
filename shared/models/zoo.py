"""torch modules for each :class:`ArchSpec` kind."""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.models.families import families_of
from shared.models.spec import ArchSpec, conv4_groups, conv4_input_shape, resnet_stride


class MLP(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = math.prod(spec.input_shape)
        for h in spec.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, spec.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, *input_shape) -> (b, classes)
        return self.net(x)


class SmallCNN(nn.Module):
    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        c, h, w = spec.input_shape
        feats: list[nn.Module] = []
        for out in spec.channels:
            for _ in range(2):
                feats += [nn.Conv2d(c, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU()]
                c = out
            feats.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        self.features = nn.Sequential(*feats)
        head: list[nn.Module] = [nn.Flatten()]
        width = c * h * w
        for hid in spec.hidden:
            head += [nn.Linear(width, hid, bias=False), nn.BatchNorm1d(hid), nn.ReLU()]
            width = hid
        head.append(nn.Linear(width, spec.num_classes))
        self.classifier = nn.Sequential(*head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) -> (b, classes)
        return self.classifier(self.features(x))


class Conv4(nn.Module):
    """The 4Conv few-shot backbone (thesis §4.6.2, §4.4.5.2): per block conv3x3 -> GroupNorm ->
    ReLU -> 2x2 max-pool at ``features.<4t>`` .. ``features.<4t+3>``, then ``head`` (Linear).
    Group normalisation does not depend on the batch, so one-sample gradient accumulation on a
    device computes the full-batch gradient (Table 4.8)."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        c, h, w = conv4_input_shape(spec)
        self.in_shape = (c, h, w)
        feats: list[nn.Module] = []
        for out in spec.hidden:
            feats += [nn.Conv2d(c, out, 3, padding=1), nn.GroupNorm(conv4_groups(out), out), nn.ReLU(),
                      nn.MaxPool2d(2)]  # fmt: skip
            c, h, w = out, h // 2, w // 2
        self.features = nn.Sequential(*feats)
        self.head = nn.Linear(c * h * w, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) or (b, h, w) -> (b, classes)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x).flatten(1))


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)); the shortcut is
    a 1x1 conv + BN (``down.0``, ``down.1``) when the stride or the width changes."""

    def __init__(self, c_in: int, width: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(c_in, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.down: nn.Sequential | None = None
        if stride != 1 or c_in != width:
            self.down = nn.Sequential(nn.Conv2d(c_in, width, 1, stride=stride, bias=False), nn.BatchNorm2d(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet(nn.Module):
    """Basic-block ResNet for small inputs (the DA³ backbone, docs/da3.md): ``stem`` (conv3x3,
    BN, ReLU at ``stem.0``..``stem.2``), ``stages.<s>.<b>`` :class:`BasicBlock`, global average
    pooling, ``head`` (Linear)."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        c = conv4_input_shape(spec)[0]
        self.stem = nn.Sequential(nn.Conv2d(c, spec.channels[0], 3, padding=1, bias=False),
                                  nn.BatchNorm2d(spec.channels[0]), nn.ReLU())  # fmt: skip
        c = spec.channels[0]
        stages = []
        for s, (width, blocks) in enumerate(zip(spec.channels, spec.hidden, strict=True)):
            stage = []
            for b in range(blocks):
                stage.append(BasicBlock(c, width, resnet_stride(s, b)))
                c = width
            stages.append(nn.Sequential(*stage))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(c, spec.num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:  # (b, c, h, w) or (b, h, w) -> (b, C)
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def build_model(spec: ArchSpec) -> nn.Module:
    """An untrained module for ``spec`` (weights from torch's default init; see init.py).

    Each model family named in ``spec.extra`` attaches what it adds to the backbone
    (shared/models/families.py; e.g. DRESS's allocation and per-subnet norm buffers). The
    module keeps its spec as ``model.arch_spec``, which seeded initialisation reads."""
    if spec.kind == "mlp":
        model: nn.Module = MLP(spec)
    elif spec.kind == "cnn":
        model = SmallCNN(spec)
    elif spec.kind == "conv4":
        model = Conv4(spec)
    elif spec.kind == "resnet":
        model = ResNet(spec)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    for family, section in families_of(spec):
        model = family.attach(model, spec, section)
    object.__setattr__(model, "arch_spec", spec)  # a plain attribute, not in the state dict
    return model
