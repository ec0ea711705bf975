"""torch modules for each :class:`ArchSpec` kind."""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.models.families import families_of
from shared.models.spec import ArchSpec


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


def build_model(spec: ArchSpec) -> nn.Module:
    """An untrained module for ``spec`` (weights from torch's default init; see init.py).

    Each model family named in ``spec.extra`` attaches what it adds to the backbone
    (shared/models/families.py; e.g. DRESS's allocation and per-subnet norm buffers). The
    module keeps its spec as ``model.arch_spec``, which seeded initialisation reads."""
    if spec.kind == "mlp":
        model: nn.Module = MLP(spec)
    elif spec.kind == "cnn":
        model = SmallCNN(spec)
    else:
        raise ValueError(f"unknown model kind {spec.kind!r}")
    for family, section in families_of(spec):
        model = family.attach(model, spec, section)
    object.__setattr__(model, "arch_spec", spec)  # a plain attribute, not in the state dict
    return model
