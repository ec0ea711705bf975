"""DRESS as a model family (registered through the ``edgeloop.model_families`` entry point).

``ArchSpec.extra["dress"] = {"sparsities": [...], "gamma": g}`` adds the ``dress`` buffers
(allocation and per-subnet norms, shared/dress/model_state.py) to the backbone, trains with
the DRESS objective (shared/dress/objective.py), and runs on a device as a
:class:`~shared.dress.DressRunner` over DRESS-CSR tables rebuilt from the state (§3.3.4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from shared.dress.model_state import (
    NAME,
    DressSpec,
    attach,
    has_allocation,
    parse_section,
    tables_from_state,
)
from shared.dress.objective import DressObjective
from shared.dress.runner import DressRunner
from shared.models.families import ModelFamily, register_family
from shared.models.init import norm_start
from shared.models.spec import ArchSpec


class DressFamily(ModelFamily[DressSpec]):
    name = NAME

    def parse(self, section: Any) -> DressSpec:
        return parse_section(section)

    def attach(self, model: nn.Module, arch: ArchSpec, spec: DressSpec) -> nn.Module:
        return attach(model, spec)

    @torch.no_grad()
    def init_from_seed(self, model: nn.Module, spec: DressSpec, seed: int) -> None:
        # Seed-independent, no draws from the generator (docs/seed-format.md §3, part of
        # generator splitmix64-sha256/1): an all-zero allocation (never DRESS-trained: devices
        # run the dense model) and per-subnet norms that start like the norm layers themselves.
        for key, tensor in model.state_dict().items():
            if self.owns(key):
                tensor.fill_(norm_start(key.rpartition(".")[2]))

    def objective(self, arch: ArchSpec, spec: DressSpec) -> DressObjective:
        return DressObjective(spec)

    def inference_engine(self, arch: ArchSpec, spec: DressSpec,
                         state: Mapping[str, torch.Tensor]) -> DressRunner | None:
        """The runner over the state's DRESS-CSR tables, on its sparsest subnet; None for a
        model without an allocation yet (version 0), which runs densely."""
        if not has_allocation(state):
            return None
        tables = tables_from_state(state, arch)
        return DressRunner(tables, subnet=tables.num_subnets - 1)


FAMILY = register_family(DressFamily())
