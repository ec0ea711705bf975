"""p-Meta as a model family (entry point ``pmeta`` in ``edgeloop.model_families``).

``ArchSpec.extra["pmeta"]`` adds ``model.pmeta``: the per-layer, per-step inner step sizes
``pmeta.alpha`` [L, K] (Eq. 4.7) and, with ``attention``, one forward and one backward meta
attention Linear per layer but the output layer, ``pmeta.att.<l>.fw`` [C_{l-1}, C_{l-1}] and
``pmeta.att.<l>.bw`` [C_l, C_l] (Eq. 4.11-4.12). Everything ships in the one state dict.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from shared.models.families import ModelFamily, register_family
from shared.models.seedgen import uniform
from shared.models.spec import ArchSpec
from shared.pmeta.spec import NAME, PMetaSpec, backbone_layers, parse_section


class PMetaModule(nn.Module):
    """α and the meta-attention modules; the backbone's forward never reads them."""

    def __init__(self, arch: ArchSpec, spec: PMetaSpec) -> None:
        super().__init__()
        layers = backbone_layers(arch)
        self.alpha = nn.Parameter(torch.full((len(layers), spec.inner_steps), spec.init_alpha))
        self.att = nn.ModuleDict()
        if spec.attention:
            for layer in layers:
                if layer.attention:
                    self.att[str(layer.index)] = nn.ModuleDict({
                        "fw": nn.Linear(layer.in_channels, layer.in_channels),
                        "bw": nn.Linear(layer.out_channels, layer.out_channels),
                    })


class PMetaFamily(ModelFamily[PMetaSpec]):
    name = NAME

    def parse(self, section: Any) -> PMetaSpec:
        return parse_section(section)

    def attach(self, model: nn.Module, arch: ArchSpec, spec: PMetaSpec) -> nn.Module:
        model.add_module(NAME, PMetaModule(arch, spec))
        return model

    @torch.no_grad()
    def init_from_seed(self, model: nn.Module, spec: PMetaSpec, seed: int) -> None:
        # docs/seed-format.md §3: α constant, attention weights uniform(fan_in = C), biases 0.
        for key, tensor in model.state_dict().items():
            if not self.owns(key):
                continue
            if key == f"{NAME}.alpha":
                tensor.fill_(spec.init_alpha)
            elif key.endswith(".bias"):
                tensor.zero_()
            else:
                values = uniform(seed, key, tensor.numel(), int(tensor.shape[1]))
                tensor.copy_(torch.from_numpy(values).reshape(tensor.shape))


FAMILY = register_family(PMetaFamily())


def pmeta_module(model: nn.Module) -> PMetaModule:
    """``model.pmeta`` (α and the attention), typed; PMetaError if the model has none."""
    from shared.pmeta.errors import PMetaError

    module = getattr(model, NAME, None)
    if not isinstance(module, PMetaModule):
        raise PMetaError("the model has no p-Meta tensors: build it with build_model(pmeta_spec(...))")
    return module


def arch_of(model: nn.Module) -> ArchSpec:
    from shared.pmeta.errors import PMetaError

    arch = getattr(model, "arch_spec", None)
    if not isinstance(arch, ArchSpec):
        raise PMetaError("model has no arch_spec: build it with shared.models.build_model(pmeta_spec(...))")
    return arch
