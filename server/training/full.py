"""Full updating: retrain every weight, from the deployed model or from scratch, with the
objective of the model's family (shared/objectives.py: cross-entropy, DRESS's Alg. 3.1, ...)."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import Field
from torch import nn

from server.training.policy import PolicyParams, RoundInputs, RoundOutcome, UpdatePolicy
from shared.models import build_model, init_weights_from_seed
from shared.objectives import FitSettings, Objective, objective_for


class FullParams(PolicyParams):
    epochs: int = Field(5, ge=1, le=1000, description="Passes over the labelled training split.")
    batch_size: int = Field(64, ge=1, le=65536)
    lr: float = Field(1e-3, gt=0, le=10)
    weight_decay: float = Field(0.0, ge=0, le=1)
    seed: int = Field(0, ge=0, description="Minibatch order (and init when from_scratch).")
    from_scratch: bool = Field(False, description="Start from fresh seeded weights, not the deployed model.")
    skip_if_worse: bool = Field(True, description="Ship nothing unless validation accuracy beats the deployed model.")
    min_labelled: int = Field(20, ge=1, description="Skip the round with fewer labelled samples.")


class FullRetrainPolicy(UpdatePolicy):
    name = "full"
    Params = FullParams

    def train(self, inputs: RoundInputs) -> RoundOutcome:
        start = prepare_full(inputs)
        if isinstance(start, RoundOutcome):
            return start
        p: FullParams = inputs.params
        settings = FitSettings(epochs=p.epochs, batch_size=p.batch_size, lr=p.lr,
                               weight_decay=p.weight_decay, seed=p.seed)
        return finish_full(inputs, start, start.objective.fit(start.model, inputs.data, settings, inputs.progress))


@dataclass
class FullStart:
    """A full retrain's starting model, its objective and the deployed model's accuracy."""

    objective: Objective
    model: nn.Module
    base_acc: float | None


def prepare_full(inputs: RoundInputs) -> FullStart | RoundOutcome:
    """Everything before the fit, shared by the in-process and the DDP round: a skip when
    there are too few labels, else the model to fit (base weights or the seeded init)."""
    p: FullParams = inputs.params
    data = inputs.data
    if data.total < p.min_labelled:
        return RoundOutcome(None, {"labelled_samples": data.total},
                            skip_reason=f"only {data.total} labelled samples (min_labelled={p.min_labelled})")
    objective = objective_for(inputs.arch)
    model = build_model(inputs.arch)
    base_acc = None
    if inputs.base_state is not None:
        model.load_state_dict(inputs.base_state)
        # An untrained base (e.g. a DRESS version 0) is no reference to beat.
        if len(data.y_val) > 0 and not objective.needs_full_fit(inputs.base_state):
            base_acc = objective.evaluate(model, data).val_accuracy
    if p.from_scratch or inputs.base_state is None:
        init_weights_from_seed(model, p.seed)
    return FullStart(objective, model, base_acc)


def finish_full(inputs: RoundInputs, start: FullStart, fit_metrics: dict) -> RoundOutcome:
    """Everything after the fit: validate, and ship only a model that beats the deployed one
    (``skip_if_worse``)."""
    p: FullParams = inputs.params
    data = inputs.data
    metrics = {"labelled_samples": data.total, "train_samples": len(data.y_train),
               "val_samples": len(data.y_val), "base_val_accuracy": start.base_acc, **fit_metrics}
    val_acc = None
    if len(data.y_val) > 0:
        evaluation = start.objective.evaluate(start.model, data)
        val_acc = evaluation.val_accuracy
        metrics.update(evaluation.details)
    metrics["val_accuracy"] = val_acc
    base_acc = start.base_acc
    if p.skip_if_worse and base_acc is not None and val_acc is not None and val_acc <= base_acc:
        return RoundOutcome(None, metrics, skip_reason=(
            f"validation accuracy {val_acc:.4f} does not beat the deployed model's {base_acc:.4f}"))
    return RoundOutcome(start.model.state_dict(), metrics, reinit_seed=p.seed if p.from_scratch else None)
