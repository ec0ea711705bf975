"""DRESS-aware training for update policies (thesis ch. 3 inside ch. 5's rounds).

When the fleet model's ArchSpec carries ``extra["dress"]``, every round optimises the DRESS
objective (weighted sum of subnet losses, Eq. 3.5-3.7) so each nested subnet improves with each
update, and the per-subnet norms (§3.3.5) and allocation travel inside the model state
(shared/dress/model_state.py). These helpers keep that out of the policies' main flow.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from server.domain.samples import LabelledData
from shared.dress import DressConfig, DressLoss, evaluate_subnets, finetune_norms, train_dress
from shared.dress.loops import TensorData
from shared.dress.masks import norm_layers
from shared.dress.model_state import DressSpec, dress_spec, store_dress_state
from shared.dress.sampling import Allocation

CALIBRATION = 1024  # training samples used to re-estimate per-subnet norm statistics


def dress_of(arch) -> DressSpec | None:
    return dress_spec(arch.extra)


def _calibration(data: LabelledData) -> TensorData:
    idx = np.random.Generator(np.random.PCG64(0)).permutation(len(data.y_train))[:CALIBRATION]
    return TensorData(data.x_train[idx], data.y_train[idx], "cpu")


def subnet_accuracies(model: nn.Module, allocation: Allocation, data: LabelledData,
                      norm_states: list[dict[str, torch.Tensor]] | None) -> list[float]:
    """Validation accuracy of every subnet with its own norms (or re-estimated statistics)."""
    val = TensorData(data.x_val, data.y_val, "cpu")
    calib = _calibration(data) if norm_layers(model) and norm_states is None else None
    return [float(a) for a in evaluate_subnets(model, allocation, val, norm_states, calibration=calib)]


def mean_subnet_metric(allocation: Allocation, data: LabelledData) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], float]:
    """DPU's validation metric for DRESS models: the average accuracy over the subnets."""
    calib = _calibration(data)

    def metric(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
        c = calib if norm_layers(model) else None
        accs = evaluate_subnets(model, allocation, TensorData(x, y, "cpu"), None, calibration=c)
        return float(sum(accs) / len(accs))

    return metric


def dress_loss_for(spec: DressSpec, allocation: Allocation) -> DressLoss:
    return DressLoss(spec.sparsities, gamma=spec.gamma, allocation=allocation)


def train_from_scratch(model: nn.Module, spec: DressSpec, data: LabelledData, *, epochs: int, batch_size: int,
                       seed: int, progress: Callable[[int, int, dict[str, float]], None]) -> dict:
    """Alg. 3.1 in full (dense pre-training, DRESS training, per-subnet norms); the result is
    written into ``model`` (backbone and ``dress`` buffers). Returns metrics."""
    has_norms = bool(norm_layers(model))
    cfg = DressConfig(sparsities=spec.sparsities, gamma=spec.gamma, pretrain_epochs=max(1, epochs // 2),
                      epochs=epochs, norm_epochs=1 if has_norms else 0, batch_size=batch_size, seed=seed)
    total = cfg.pretrain_epochs + cfg.epochs + cfg.norm_epochs
    step = [0]

    def report(stage: str, epoch: int, metrics: dict) -> None:
        step[0] += 1
        progress(min(step[0], total), total, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})

    result = train_dress(model, data.x_train, data.y_train, data.x_val, data.y_val, cfg, progress=report)
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in result.state.items() if not k.startswith("dress.")}})
    store_dress_state(model, result.allocation, result.norm_states)
    return {"subnet_val_accuracy": [float(a) for a in result.val_accuracy]}


def finish_partial_round(model: nn.Module, spec: DressSpec, allocation: Allocation, data: LabelledData,
                         *, batch_size: int, seed: int) -> None:
    """After a DPU round on a DRESS model: re-tune the per-subnet norms (§3.3.5) of the new
    weights and store them with the (unchanged) allocation in the model's ``dress`` buffers."""
    if norm_layers(model):
        cfg = DressConfig(sparsities=spec.sparsities, gamma=spec.gamma, pretrain_epochs=0, epochs=1,
                          norm_epochs=1, batch_size=batch_size, seed=seed)
        norm_states = finetune_norms(model, allocation, TensorData(data.x_train, data.y_train, "cpu"), cfg)
    else:
        norm_states = None
    store_dress_state(model, allocation, norm_states)
