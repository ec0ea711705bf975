"""DA³ as a model family (entry point ``edgeloop.model_families``: ``da3``).

``ArchSpec.extra["da3"]`` (shared/da3/spec.py) wraps a ``resnet`` backbone into
:class:`~shared.da3.net.DA3Net` with one adaptor per block under ``da3.``. It trains with the
plain cross-entropy objective when a policy retrains it as a whole; per-domain adaptation is
:func:`shared.da3.train.train_domain`. A device runs the module itself (its forward skips the
correction where the gate is closed), so the family offers no separate inference engine.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.da3.net import DA3Net
from shared.da3.spec import NAME, PIGGYBACK_INIT, DA3Error, DA3Spec, parse_section
from shared.models.families import ModelFamily, register_family
from shared.models.init import fan_in_of
from shared.models.seedgen import uniform
from shared.models.spec import ArchSpec


def init_rule(key: str, spec: DA3Spec) -> str:
    """Which seeded-init rule a ``da3.`` tensor follows (docs/seed-format.md §3): "uniform"
    (the §2 draws, fan-in of its own shape), "gate_bias" (the section's constant),
    "piggyback" (the score constant) or "zero"."""
    if key.endswith(".gate.weight") or (spec.adaptor == "tinytl" and key.endswith(".conv.weight")):
        return "uniform"
    if key.endswith(".gate.bias"):
        return "gate_bias"
    if key.startswith(NAME + ".scores."):
        return "piggyback"
    return "zero"  # corrections, adapters, lite projections: the model starts as the backbone


class DA3Family(ModelFamily[DA3Spec]):
    name = NAME

    def parse(self, section: Any) -> DA3Spec:
        return parse_section(section)

    def attach(self, model: nn.Module, arch: ArchSpec, spec: DA3Spec) -> nn.Module:
        if arch.kind != "resnet":
            raise DA3Error(f"the da3 family needs a 'resnet' backbone, got {arch.kind!r}")
        return DA3Net(model, arch, spec)

    @torch.no_grad()
    def init_from_seed(self, model: nn.Module, spec: DA3Spec, seed: int) -> None:
        for key, tensor in model.state_dict().items():
            if not self.owns(key):
                continue
            rule = init_rule(key, spec)
            if rule == "uniform":
                values = uniform(seed, key, tensor.numel(), fan_in_of(tensor.shape))
                tensor.copy_(torch.from_numpy(values).reshape(tensor.shape))
            elif rule == "gate_bias":
                tensor.fill_(spec.gate_bias)
            elif rule == "piggyback":
                tensor.fill_(PIGGYBACK_INIT)
            else:
                tensor.zero_()


FAMILY = register_family(DA3Family())
