"""Deep Partial Updating rounds (thesis Alg. 5.2) that ship sparse, encoded weight diffs.

The algorithm is :func:`shared.dpu.partial_update`; this policy adds what a deployment needs:
- the first round after the untrained version 0 is a full training (the thesis's initial
  deployment on D^1) unless ``full_first_round`` is off; a model its objective cannot update
  partially yet (a DRESS model without an allocation) is fitted in full (Alg. 3.1);
- the shipped bytes are a ``diff/sparse-v1`` artefact from ``shared.codec``; with fp16/int8
  values the published version is exactly what the device reconstructs
  (``SparseUpdate.target``), and that model is the one validated;
- quantisation error is carried into the next round (error feedback, shared.dpu.add_residual);
- re-initialisation (§5.4.2) publishes the seeded model as its own version (shipped as a seed
  artefact of ~200 bytes) and the diff from it;
- ``byte_budget`` turns "ship at most B bytes" into k, verified against the real encoding.

What is optimised and how a version is scored comes from the objective of the model's family
(shared/objectives.py); nothing here depends on the family. Between rounds of a lineage the
policy carries a :class:`DPUState`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

import shared.codec as codec
from server.training.policy import (
    PolicyParams,
    PolicyState,
    RoundInputs,
    RoundOutcome,
    UpdatePolicy,
)
from shared.dpu import (
    DPUConfig,
    ShadowChain,
    add_residual,
    dense_bytes,
    k_for_byte_budget,
    num_partial_weights,
    paper_update_bits,
    partial_parameter_names,
    partial_update,
)
from shared.models import build_model, model_hash
from shared.objectives import FitSettings, Objective, objective_for
from shared.tensors import clone_state

VALUE_BITS = {"fp32": 32, "fp16": 16, "int8": 8, "alq": 2}  # alq: AlqParams.avg_bits (docs/alq.md)
MAX_BUDGET_ATTEMPTS = 3
StateDict = dict[str, torch.Tensor]


class DPUParams(PolicyParams):
    k: float = Field(0.01, gt=0, le=1, description="Updating ratio: share of conv/fc weights shipped (Eq. 5.2).")
    byte_budget: int | None = Field(None, ge=256, description="Ship at most this many bytes per device; overrides k.")
    value_format: Literal["fp32", "fp16", "int8", "alq"] = Field(
        "fp32", description="How changed values are encoded (alq: 2-bit multi-bit deltas, docs/alq.md).")
    variant: Literal["dpu", "gcpu", "rpu", "magnitude", "full"] = Field(
        "dpu", description="dpu (Alg. 5.2), gcpu (Alg. 5.1), rpu (random), magnitude (pruning), full.")
    epochs: int = Field(10, ge=1, le=1000, description="Epochs of each of the two DPU steps.")
    batch_size: int = Field(128, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "sgd"] = "adam"
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = Field(0, ge=0, description="Minibatch order (and the RPU mask).")
    init_seed: int = Field(0, ge=0, description="Seed of re-initialised weights (§5.4.2).")
    reinit: bool | None = Field(None, description="None: re-initialise when data doubled since the last init; true/false force it.")
    skip_if_worse: bool = Field(True, description="Ship nothing unless validation accuracy beats the deployed model.")
    full_first_round: bool = Field(True, description="Train every weight when the deployed model is the untrained version 0.")
    min_labelled: int = Field(20, ge=1)


_RESIDUAL, _SHADOW = "residual/", "shadow/"


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not 0 <= int(value) < 2**63:
        raise ValueError(f"{what} must be an integer in [0, 2**63), got {value!r}")
    return int(value)


@dataclass
class DPUState(PolicyState):
    """What DPU carries from one round of a lineage to the next.

    - ``n_at_last_init``: |D| when the current chain was last (re-)initialised; the §5.4.2 rule
      re-initialises once the data more than doubles it. None: not known (no state yet: a new
      lineage, an upgraded server, a record set aside); the round then takes its own training
      set as the reference, so the rule works from the next round on;
    - ``shadow``: the re-initialised chain trained beside the deployed one (§5.5.3);
    - ``residual``: per tensor, what quantised encoding lost so far (error feedback), added to
      the next shipped values.

    Record: ``meta = {"n_at_last_init": n | None, "shadow": {"seed", "rounds"} | None}``,
    tensors ``residual/<name>`` and ``shadow/<name>``.
    """

    SCHEMA: ClassVar[int] = 1

    n_at_last_init: int | None = None
    shadow: ShadowChain | None = None
    residual: dict[str, torch.Tensor] | None = None

    def to_record(self) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors = {_RESIDUAL + n: t for n, t in (self.residual or {}).items()}
        shadow = None
        if self.shadow is not None:
            tensors.update({_SHADOW + n: t for n, t in self.shadow.state.items()})
            shadow = {"seed": self.shadow.seed, "rounds": self.shadow.rounds}
        return {"n_at_last_init": self.n_at_last_init, "shadow": shadow}, tensors

    @classmethod
    def from_record(cls, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> DPUState:
        if not isinstance(meta, Mapping) or set(meta) - {"n_at_last_init", "shadow"}:
            raise ValueError(f"DPU state metadata must hold n_at_last_init and shadow, got {meta!r}")
        n = meta.get("n_at_last_init")
        n = None if n is None else _count(n, "n_at_last_init")
        residual: dict[str, torch.Tensor] = {}
        shadow_state: dict[str, torch.Tensor] = {}
        for key, t in tensors.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"DPU state tensor {key!r} is not a tensor")
            if key.startswith(_RESIDUAL) and len(key) > len(_RESIDUAL):
                if not t.is_floating_point():
                    raise ValueError(f"DPU residual {key!r} has dtype {t.dtype}, expected a float type")
                residual[key[len(_RESIDUAL):]] = t
            elif key.startswith(_SHADOW) and len(key) > len(_SHADOW):
                shadow_state[key[len(_SHADOW):]] = t
            else:
                raise ValueError(f"DPU state has an unknown tensor {key!r}")
        raw = meta.get("shadow")
        shadow = None
        if raw is not None:
            if not isinstance(raw, Mapping) or set(raw) != {"seed", "rounds"}:
                raise ValueError(f"DPU shadow metadata must be {{seed, rounds}}, got {raw!r}")
            if not shadow_state:
                raise ValueError("DPU state names a shadow chain but holds none of its tensors")
            shadow = ShadowChain(_count(raw["seed"], "shadow seed"), shadow_state,
                                 _count(raw["rounds"], "shadow rounds"))
        elif shadow_state:
            raise ValueError("DPU state holds shadow tensors but no shadow metadata")
        return cls(n, shadow, residual or None)

    def misfit(self, base: Mapping[str, torch.Tensor]) -> str | None:
        """Why this state cannot be used with a model shaped like ``base`` (None: it can)."""
        if self.shadow is not None:
            got = {n: tuple(t.shape) for n, t in self.shadow.state.items()}
            if got != {n: tuple(t.shape) for n, t in base.items()}:
                return "its shadow chain does not fit the deployed model's tensors"
        for n, r in (self.residual or {}).items():
            if n not in base or tuple(r.shape) != tuple(base[n].shape):
                return f"its residual {n!r} does not fit the deployed model"
        return None


@dataclass
class _Shipment:
    """What a round means to ship, before encoding (the inputs of :meth:`DPUPolicy._encode`)."""

    diff_base: StateDict  # what the device holds before applying the diff
    intended: StateDict  # the trained model to ship (before quantisation)
    mask: dict[str, torch.Tensor] | None  # weights the update may change (None: all)
    reinit_seed: int | None  # set when diff_base is the seeded re-initialisation
    base_val: float | None  # the deployed model's validation score (None: no reference)
    k_effective: float
    num_partial: int
    next_n: int  # n_at_last_init to carry
    shadow: ShadowChain | None  # shadow chain to carry
    first: bool  # the first round after version 0 (no residual to absorb)


class DPUPolicy(UpdatePolicy):
    name = "dpu"
    Params = DPUParams
    State = DPUState

    def train(self, inputs: RoundInputs) -> RoundOutcome:
        p: DPUParams = inputs.params
        data = inputs.data
        base = inputs.base_state
        carried: DPUState = inputs.state or DPUState()
        if data.total < p.min_labelled or len(data.y_val) == 0:
            return RoundOutcome(None, {"labelled_samples": data.total}, state=inputs.state, skip_reason=(
                f"only {data.total} labelled samples ({len(data.y_val)} for validation); need {p.min_labelled}"))
        if base is None:
            raise ValueError("DPU needs a deployed model to update")
        metrics: dict = {"labelled_samples": data.total, "train_samples": len(data.y_train),
                         "val_samples": len(data.y_val), "value_format": p.value_format}
        misfit = carried.misfit(base)
        if misfit:
            metrics["state_dropped"] = f"carried DPU state not used: {misfit}"
            carried = DPUState(carried.n_at_last_init)
        objective = objective_for(inputs.arch)
        model = build_model(inputs.arch)
        model.load_state_dict(base)
        settings = FitSettings(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                               weight_decay=p.weight_decay, seed=p.seed)
        first = p.full_first_round and inputs.base_method == "init"
        if objective.needs_full_fit(base):
            # Nothing to update partially yet (DRESS: no subnets before Alg. 3.1): fit in full.
            metrics.update(variant=f"{objective.name}-full", k=1.0, base_val_accuracy=None)
            metrics.update(objective.fit(model, data, settings, inputs.progress))
            nnz = sum(int(base[n].numel()) for n in partial_parameter_names(model))
            return self._encode(inputs, p, objective, model, metrics, carried, _Shipment(
                diff_base=base, intended=clone_state(model.state_dict()), mask=None, reinit_seed=None,
                base_val=None, k_effective=1.0, num_partial=nnz, next_n=len(data.y_train), shadow=None,
                first=True))
        variant = "full" if first else p.variant
        n_at_last_init = None if first else carried.n_at_last_init
        names = partial_parameter_names(model)
        k = p.k
        if p.byte_budget is not None and variant != "full":
            k = self._k_for_budget(p.byte_budget, base, names, p.value_format)
        metrics["variant"] = variant
        loss_fn = objective.loss_fn(model, base)
        metric_fn = objective.metric_fn(model, base, data)
        for attempt in range(MAX_BUDGET_ATTEMPTS):
            cfg = DPUConfig(k=k, method=variant, epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                            optimizer=p.optimizer, weight_decay=p.weight_decay, seed=p.seed, init_seed=p.init_seed,
                            skip_if_worse=p.skip_if_worse)
            # A re-initialised "shadow" chain (§5.5.3) trains beside the deployed one across
            # rounds; every attempt starts from the carried one.
            result = partial_update(model, base, data.x_train, data.y_train, data.x_val, data.y_val, cfg,
                                    loss_fn=loss_fn, progress=inputs.progress, metric_fn=metric_fn,
                                    n_at_last_init=n_at_last_init, reinit=p.reinit, shadow=carried.shadow)
            next_n = result.next_n_at_last_init(n_at_last_init)
            if next_n is None:  # first round, or no reference yet: count from this round's data
                next_n = result.n_train
            # What to carry when nothing ships: the chain's progress, the unshipped residual.
            unshipped = DPUState(next_n, result.shadow, carried.residual)
            metrics.update(k=k, k_effective=result.k_effective, nnz=result.nnz, num_partial=result.num_partial,
                           base_val_accuracy=result.base_val_accuracy, val_accuracy=result.val_accuracy,
                           n_at_last_init=next_n)
            if result.notes:
                metrics["notes"] = result.notes
            if result.skipped:
                return RoundOutcome(None, metrics, skip_reason=result.skip_reason, state=unshipped)
            model.load_state_dict(result.state)
            objective.finish(model, base, data, settings)
            outcome = self._encode(inputs, p, objective, model, metrics, carried, _Shipment(
                diff_base=result.diff_base, intended=clone_state(model.state_dict()), mask=result.mask,
                reinit_seed=result.reinit_seed, base_val=result.base_val_accuracy,
                k_effective=result.k_effective, num_partial=result.num_partial, next_n=next_n,
                shadow=result.shadow, first=first))
            if outcome.model is None or p.byte_budget is None or metrics["diff_bytes"] <= p.byte_budget:
                return outcome
            # The estimate was optimistic: shrink k in proportion and run the round again.
            k = k * p.byte_budget / metrics["diff_bytes"] * 0.97
            metrics["budget_retries"] = attempt + 1
        return RoundOutcome(None, metrics, state=unshipped, skip_reason=(
            f"could not fit byte_budget={p.byte_budget} after {MAX_BUDGET_ATTEMPTS} attempts"))

    @staticmethod
    def _k_for_budget(budget: int, base, names, value_format: str) -> float:
        # The codec lands within ~3% of the paper's accounting for fp32 and well below it for
        # fp16/int8 (bench/codec.py); 5% plus a header allowance keeps the estimate conservative,
        # and the real encoding is checked afterwards.
        header = 160 + 96 * len(base)
        total = num_partial_weights(base, names)
        dense = dense_bytes(base, names)

        def size_fn(k: float) -> int:
            return math.ceil(1.05 * paper_update_bits(k, total, VALUE_BITS[value_format]) / 8) + dense + header

        return max(k_for_byte_budget(budget, base, names, VALUE_BITS[value_format], size_fn), 1e-6)

    def _encode(self, inputs: RoundInputs, p: DPUParams, objective: Objective, model, metrics: dict,
                carried: DPUState, ship: _Shipment) -> RoundOutcome:
        """Encode ``ship`` as a diff, score what the device will reconstruct, and say what to
        carry. ``metrics`` is updated in place."""
        reinit = ship.reinit_seed is not None
        quantised = p.value_format != "fp32"
        intended = ship.intended
        leftover: dict[str, torch.Tensor] = {}
        if carried.residual and not reinit and not ship.first and quantised:
            intended, leftover = add_residual(intended, carried.residual, mask=ship.mask)
        update = codec.make_update(ship.diff_base, intended, value_format=p.value_format,
                                   arch=inputs.arch)
        target = update.target
        model.load_state_dict(target)
        if quantised and "val_accuracy" in metrics:
            metrics["val_accuracy_unquantised"] = metrics["val_accuracy"]
        evaluation = objective.evaluate(model, inputs.data)
        metrics.update(evaluation.details)
        metrics["val_accuracy"] = evaluation.val_accuracy
        metrics["n_at_last_init"] = ship.next_n
        residual = None
        if quantised:
            if p.skip_if_worse and ship.base_val is not None and evaluation.val_accuracy <= ship.base_val:
                return RoundOutcome(None, metrics, state=DPUState(ship.next_n, ship.shadow, carried.residual),
                                    skip_reason=(
                    f"after {p.value_format} encoding, validation accuracy {evaluation.val_accuracy:.4f} does "
                    f"not beat the deployed model's {ship.base_val:.4f}"))
            residual = {n: update.residual[n] + leftover.get(n, 0) for n in update.residual}
        base_hash = model_hash(inputs.arch, ship.diff_base)
        diff = codec.encode_update(update, base_hash)
        metrics["diff_bytes"] = len(diff)
        metrics["diff_sections"] = codec.size_breakdown(diff)
        metrics["paper_bytes"] = math.ceil(
            codec.ideal_paper_bits(ship.k_effective, ship.num_partial, VALUE_BITS[p.value_format]) / 8)
        return RoundOutcome(target, metrics, reinit_seed=ship.reinit_seed, diff=diff,
                            diff_encoding=codec.DIFF_ENCODING, diff_base_hash=base_hash,
                            diff_base_state=ship.diff_base if reinit else None,
                            state=DPUState(ship.next_n, ship.shadow, residual))
