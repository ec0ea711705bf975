"""The DRESS objective (thesis ch. 3) inside any update policy (ch. 5's rounds).

Every round of a DRESS model optimises the weighted sum of subnet losses (Eq. 3.5-3.7) with
the allocation stored in the deployed model, so each nested subnet improves with each update;
a version is scored by its subnets' mean validation accuracy, each subnet with its own
normalisation parameters (§3.3.5). Allocation and per-subnet norms travel inside the model
state (shared/dress/model_state.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from shared.dress.layers import DressError
from shared.dress.loops import TensorData
from shared.dress.loss import DressLoss
from shared.dress.masks import norm_layers
from shared.dress.model_state import (
    PREFIX,
    DressSpec,
    allocation_from_state,
    has_allocation,
    norm_states_from_state,
    store_dress_state,
)
from shared.dress.sampling import Allocation
from shared.dress.train import DressConfig, evaluate_subnets, finetune_norms, train_dress
from shared.objectives import (
    Evaluation,
    FitSettings,
    LabelledArrays,
    LossFn,
    MetricFn,
    Objective,
    ProgressFn,
    StateDict,
)
from shared.training import accuracy

CALIBRATION = 1024  # training samples used to re-estimate per-subnet norm statistics


def _calibration(data: LabelledArrays) -> TensorData:
    idx = np.random.Generator(np.random.PCG64(0)).permutation(len(data.y_train))[:CALIBRATION]
    return TensorData(data.x_train[idx], data.y_train[idx], "cpu")


class DressObjective(Objective):
    name = "dress"

    def __init__(self, spec: DressSpec) -> None:
        self.spec = spec

    def _allocation(self, model: nn.Module, state: StateDict) -> Allocation:
        allocation = allocation_from_state(model, state, self.spec)
        if allocation is None:
            raise DressError("this DRESS model has no allocation yet: fit it in full first (Alg. 3.1)")
        return allocation

    def loss_fn(self, model: nn.Module, base_state: StateDict) -> LossFn:
        return DressLoss(self.spec.sparsities, gamma=self.spec.gamma,
                         allocation=self._allocation(model, base_state))

    def metric_fn(self, model: nn.Module, base_state: StateDict, data: LabelledArrays) -> MetricFn:
        """The mean accuracy over the subnets, each with norm statistics re-estimated on a
        fixed training subset (the stored per-subnet norms belong to the base weights)."""
        allocation = self._allocation(model, base_state)
        calib = _calibration(data)

        def metric(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
            c = calib if norm_layers(m) else None
            accs = evaluate_subnets(m, allocation, TensorData(x, y, "cpu"), None, calibration=c)
            return float(sum(accs) / len(accs))

        return metric

    def needs_full_fit(self, state: StateDict) -> bool:
        return not has_allocation(state)  # no subnets to update yet

    def fit(self, model: nn.Module, data: LabelledArrays, settings: FitSettings,
            progress: ProgressFn | None = None) -> dict[str, Any]:
        """Alg. 3.1 in full (dense pre-training for half the epochs, DRESS training, per-subnet
        norms); the result is written into ``model`` (backbone and ``dress`` buffers).

        Without a validation split, checkpoints and allocations are chosen on the training
        split (better than none: stage 2 needs a score per epoch), and the per-subnet scores
        are returned as ``subnet_train_accuracy``, never passed off as validation scores."""
        has_norms = bool(norm_layers(model))
        cfg = DressConfig(sparsities=self.spec.sparsities, gamma=self.spec.gamma,
                          pretrain_epochs=max(1, settings.epochs // 2), epochs=settings.epochs,
                          norm_epochs=1 if has_norms else 0, batch_size=settings.batch_size,
                          seed=settings.seed)
        total = cfg.pretrain_epochs + cfg.epochs + cfg.norm_epochs
        step = [0]

        def report(stage: str, epoch: int, metrics: dict) -> None:
            step[0] += 1
            if progress is not None:
                progress(min(step[0], total), total,
                         {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

        has_val = len(data.y_val) > 0
        x_val, y_val = (data.x_val, data.y_val) if has_val else (data.x_train, data.y_train)
        result = train_dress(model, data.x_train, data.y_train, x_val, y_val, cfg, progress=report)
        backbone = {k: v for k, v in result.state.items() if not k.startswith(PREFIX)}
        model.load_state_dict({**model.state_dict(), **backbone})
        store_dress_state(model, result.allocation, result.norm_states)
        key = "subnet_val_accuracy" if has_val else "subnet_train_accuracy"
        return {key: [float(a) for a in result.val_accuracy]}

    def finish(self, model: nn.Module, base_state: StateDict, data: LabelledArrays,
               settings: FitSettings) -> None:
        """Re-tune the per-subnet norms (§3.3.5) of the new weights and store them with the
        (unchanged) allocation in the model's ``dress`` buffers."""
        allocation = self._allocation(model, base_state)
        if norm_layers(model):
            cfg = DressConfig(sparsities=self.spec.sparsities, gamma=self.spec.gamma,
                              pretrain_epochs=0, epochs=1, norm_epochs=1,
                              batch_size=settings.batch_size, seed=settings.seed)
            norm_states = finetune_norms(model, allocation, TensorData(data.x_train, data.y_train, "cpu"), cfg)
        else:
            norm_states = None
        store_dress_state(model, allocation, norm_states)

    def evaluate(self, model: nn.Module, data: LabelledArrays) -> Evaluation:
        """Every subnet's validation accuracy with its stored norms; the mean is the score. A
        model never DRESS-trained runs densely on the device, and is scored densely."""
        state = model.state_dict()
        allocation = allocation_from_state(model, state, self.spec)
        if allocation is None:
            return Evaluation(accuracy(model, data.x_val, data.y_val))
        norm_states = norm_states_from_state(model, state, self.spec)
        val = TensorData(data.x_val, data.y_val, "cpu")
        calib = _calibration(data) if norm_layers(model) and norm_states is None else None
        accs = [float(a) for a in evaluate_subnets(model, allocation, val, norm_states, calibration=calib)]
        return Evaluation(sum(accs) / len(accs), {"subnet_val_accuracy": accs})
