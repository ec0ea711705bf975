"""The trainer seam: an UpdatePolicy turns (deployed model, labelled data, params) into the
next version, or into a reasoned "skip". The round worker owns everything around it
(claiming, publishing, delivery); policies are pure compute over tensors."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from server.domain.samples import LabelledData
from shared.models import ArchSpec

ProgressFn = Callable[[int, int, dict[str, float]], None]


class PolicyParams(BaseModel):
    """Parameters every policy accepts; subclasses add their own. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class RoundInputs:
    arch: ArchSpec
    base_state: dict[str, torch.Tensor] | None  # the deployed model (None: nothing deployed)
    base_hash: str | None
    data: LabelledData
    params: Any  # an instance of the policy's Params
    progress: ProgressFn
    # Metrics of the deployed version (plus its "method"): bookkeeping that must survive
    # restarts, e.g. DPU's data size at the last re-initialisation, travels here.
    base_metrics: dict[str, Any] = field(default_factory=dict)
    # Policy-owned state carried between rounds (e.g. DPU's data size at the last
    # re-initialisation, quantisation residuals); JSON-able values or tensors.
    carry: dict[str, Any] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    state: dict[str, torch.Tensor] | None  # None: ship nothing
    metrics: dict[str, Any]
    skip_reason: str | None = None
    reinit_seed: int | None = None
    # Optional smaller artefact against the base model (e.g. a sparse diff) and its encoding.
    diff: bytes | None = None
    diff_encoding: str | None = None
    # The model the diff applies to: the deployed model, or (after a re-initialisation) the
    # seeded weights, given as their state so the worker can publish that version too.
    diff_base_hash: str | None = None
    diff_base_state: dict[str, torch.Tensor] | None = None
    carry: dict[str, Any] = field(default_factory=dict)


class UpdatePolicy(ABC):
    """One method of producing a new model version (``full``, ``dpu``...)."""

    name: ClassVar[str]
    Params: ClassVar[type[PolicyParams]]

    def parse_params(self, raw: dict[str, Any]) -> PolicyParams:
        return self.Params.model_validate(raw)

    @abstractmethod
    def run(self, inputs: RoundInputs) -> RoundOutcome:
        """Train and return the outcome. Must not touch the database or the network."""
