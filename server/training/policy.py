"""The trainer seam: an UpdatePolicy turns (deployed model, labelled data, params, carried
state) into the next version, or into a reasoned "skip". The round worker owns everything
around it (claiming, loading and saving carried state in the round's transaction, publishing,
delivery); policies are pure compute over tensors.

Two orthogonal axes, no family branches:
- the *objective* (``shared.objectives``, chosen by the model family of ``inputs.arch``) says
  what is optimised and how a version is evaluated;
- the *policy* (this module's subclasses) says what ships: the whole model, a DPU diff, ...

Every round trains under a divergence bound (:func:`loss_bound`): a minibatch loss that is not
finite, or above ``max_loss_factor`` times the objective's chance-level loss, raises
``shared.loop.TrainingDivergedError`` out of :meth:`UpdatePolicy.run`, and the worker fails
the round with that message (step and loss) instead of publishing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

import torch
from pydantic import BaseModel, ConfigDict, Field

from server.domain.samples import LabelledData
from shared.loop import LossBound, bound_loss
from shared.models import ArchSpec
from shared.objectives import objective_for

ProgressFn = Callable[[int, int, dict[str, float]], None]
StateDict = dict[str, torch.Tensor]


# An untrained classifier starts near the chance-level loss (ln C for cross-entropy). A trained
# Fashion-MNIST MLP scored on every label shifted by one scores ~7x it; inputs at the ingest
# bound (1000) give an untrained MLP ~35x. A run three orders of magnitude above has exploded,
# or trains on out-of-range data (float inputs of 1e30 trained at a loss of 1e27).
DEFAULT_MAX_LOSS_FACTOR = 1000.0


class PolicyParams(BaseModel):
    """Parameters every policy accepts; subclasses add their own. Unknown keys are refused."""

    model_config = ConfigDict(extra="forbid")

    max_loss_factor: float | None = Field(
        DEFAULT_MAX_LOSS_FACTOR, gt=1, le=1e12, description=(
            "The round fails as diverged when a minibatch training loss exceeds this multiple of "
            "the chance-level loss (cross-entropy: ln of the class count, so 2303 for 10 classes "
            "at the default). null: only a NaN or infinite loss fails it."))


def loss_bound(arch: ArchSpec, params: PolicyParams) -> LossBound | None:
    """The divergence bound of a round: ``max_loss_factor`` x the chance-level loss of the
    objective of ``arch``'s family (None when the factor is null)."""
    factor = params.max_loss_factor
    if factor is None:
        return None
    chance = objective_for(arch).chance_loss(arch)
    return LossBound(factor * chance, why=f"max_loss_factor={factor:g} x chance-level loss {chance:.4g}")


class PolicyState(ABC):
    """State a policy carries from one round of a lineage to the next (typed, versioned).

    The worker stores it as one row per (lineage, method) in ``policy_states``: ``meta`` in a
    JSON column and ``tensors`` as one safetensors blob. ``SCHEMA`` is stored with it; a record
    written under another schema is set aside before :meth:`from_record` sees it
    (``state_store.load_state``: the policy then starts without carried state and says so in
    the round metrics), never silently misread.
    """

    SCHEMA: ClassVar[int] = 1

    @abstractmethod
    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """(JSON-able metadata, tensors by name)."""

    @classmethod
    @abstractmethod
    def from_record(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> PolicyState:
        """Inverse of :meth:`to_record`; raises ValueError on a malformed record."""


S = TypeVar("S", bound=PolicyState)


@dataclass
class RoundInputs(Generic[S]):
    arch: ArchSpec
    base_state: StateDict | None  # the model the cohort runs (None: nothing deployed)
    base_hash: str | None
    base_method: str | None  # how the base version was made ("init", "full", "dpu", "reinit")
    data: LabelledData
    params: Any  # an instance of the policy's Params
    progress: ProgressFn
    state: S | None = None  # carried state of this policy for this lineage (None: none yet)
    # The base version's own architecture (None: ``arch``); differs from ``arch`` when the
    # cohort runs an adapted model (a DA³ adaptor over the fleet backbone).
    base_arch: ArchSpec | None = None


@dataclass
class RoundOutcome(Generic[S]):
    model: StateDict | None  # None: ship nothing
    metrics: dict[str, Any]
    skip_reason: str | None = None
    reinit_seed: int | None = None
    # Optional smaller artefact against the base model (e.g. a sparse diff) and its encoding.
    diff: bytes | None = None
    diff_encoding: str | None = None
    # The model the diff applies to: the deployed model, or (after a re-initialisation) the
    # seeded weights, given as their state so the worker can publish that version too.
    diff_base_hash: str | None = None
    diff_base_state: StateDict | None = None
    # What to carry into the next round of this lineage; also on a skip. None: carry nothing
    # (the stored record is emptied, not deleted, so its generation never goes back).
    state: S | None = None
    # The architecture of the version to publish when it is not the round's ``arch`` (a DA³
    # round publishes the adapted spec; its ``diff`` is the adaptor artefact). None: ``arch``.
    arch: ArchSpec | None = None


class UpdatePolicy(ABC):
    """One method of producing a new model version (``full``, ``dpu``...)."""

    name: ClassVar[str]
    Params: ClassVar[type[PolicyParams]]
    State: ClassVar[type[PolicyState] | None] = None  # None: the policy carries nothing

    def parse_params(self, raw: dict[str, Any]) -> PolicyParams:
        return self.Params.model_validate(raw)

    def run(self, inputs: RoundInputs) -> RoundOutcome:
        """:meth:`train` under the round's divergence bound (:func:`loss_bound`); a loss that
        explodes or is not finite raises ``shared.loop.TrainingDivergedError``."""
        with bound_loss(loss_bound(inputs.arch, inputs.params)):
            return self.train(inputs)

    @abstractmethod
    def train(self, inputs: RoundInputs) -> RoundOutcome:
        """Train and return the outcome. Must not touch the database or the network."""
