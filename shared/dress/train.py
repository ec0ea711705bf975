"""The three DRESS training stages (thesis Alg. 3.1): dense pre-training, parallel subnet
training with the weighted loss, then per-subnet fine-tuning of normalisation layers (§3.3.5).

All stages use Nesterov SGD with a cosine learning-rate decay and the same hyper-parameters, as
in §3.4.1. Data are in-memory arrays (``uint8`` images are scaled by ``to_model_input``), moved
once to ``device``; pass ``device="cuda"`` to train on a GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shared.dress.costs import layer_costs
from shared.dress.layers import DressError
from shared.dress.loops import TensorData, accuracy_on, cross_entropy, recalibrate_norms, sgd_epochs
from shared.dress.loss import backbone_weights, dress_loss
from shared.dress.masks import SubnetMasks, load_norm_state, norm_layers, norm_state
from shared.dress.sampling import (
    ALLOCATION_MODES,
    DEFAULT_GAMMA,
    DEFAULT_SPARSITIES,
    Allocation,
    allocate_sparsity,
    check_sparsities,
    loss_weights,
)
from shared.tensors import clone_state

CALIBRATION_SAMPLES = 2048  # training samples used to re-estimate norm statistics for validation
Progress = Callable[[str, int, dict[str, float]], None]  # (stage, epoch, metrics)


@dataclass(frozen=True)
class DressConfig:
    sparsities: tuple[float, ...] = DEFAULT_SPARSITIES["cnn"]
    gamma: float = DEFAULT_GAMMA  # Eq. 3.6 correction factor
    # layer-wise sparsity: "global" magnitude (§3.3.2, the thesis), "uniform", or "latency"
    # (global magnitude per unit of FLOP cost; shared.dress.sampling.allocate_sparsity)
    allocation: str = "global"
    pretrain_epochs: int = 5  # stage 1: dense backbone (0 when the model is already trained)
    epochs: int = 10  # stage 2: DRESS training
    norm_epochs: int = 1  # stage 3: per-subnet norm fine-tuning (0: statistics only)
    batch_size: int = 128
    lr: float = 0.05  # Nesterov SGD, cosine decay to 0 within each stage (§3.4.1)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0  # minibatch order

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsities", check_sparsities(self.sparsities))
        loss_weights(self.sparsities, self.gamma)
        if self.allocation not in ALLOCATION_MODES:
            raise DressError(
                f"allocation must be one of {ALLOCATION_MODES}, got {self.allocation!r}"
            )
        if min(self.pretrain_epochs, self.epochs, self.norm_epochs) < 0 or self.epochs < 1:
            raise DressError(
                f"epochs must be >= 0 (DRESS epochs >= 1), got pretrain={self.pretrain_epochs} "
                f"epochs={self.epochs} norm={self.norm_epochs}"
            )
        if (
            self.batch_size < 1
            or not self.lr > 0
            or not 0 <= self.momentum < 1
            or self.weight_decay < 0
        ):
            raise DressError(
                f"invalid optimiser settings: batch_size={self.batch_size} lr={self.lr} "
                f"momentum={self.momentum} weight_decay={self.weight_decay}"
            )


@dataclass
class DressResult:
    state: dict[str, torch.Tensor]  # dense backbone w of the best epoch (CPU)
    allocation: Allocation  # layer-wise counts saved with it
    norm_states: list[dict[str, torch.Tensor]] | None  # per-subnet norms (None: no norm layers)
    val_accuracy: list[float]  # per subnet, after stage 3
    history: list[dict[str, object]] = field(default_factory=list)


@dataclass
class _Stage2:
    """Alg. 3.1 stage-2 bookkeeping across epochs: the current allocation and the best epoch."""

    alloc: Allocation
    best: float = -1.0
    best_state: dict[str, torch.Tensor] | None = None
    best_alloc: Allocation | None = None


def evaluate_subnets(
    model: nn.Module,
    allocation: Allocation,
    data: TensorData,
    norm_states: Sequence[dict[str, torch.Tensor]] | None = None,
    *,
    calibration: TensorData | None = None,
) -> list[float]:
    """Top-1 accuracy of every subnet ``w ⊙ m_k`` (masks from the current weights).

    Norms: subnet ``k``'s entry of ``norm_states`` if given; else, with ``calibration`` data,
    the shared affine parameters with running statistics re-estimated for that subnet; else the
    shared norms as they are. The model's own norm state is restored afterwards.
    """
    saved = norm_state(model)
    try:
        with SubnetMasks(model, allocation, norm_states) as masks:
            accs = []
            for k in range(allocation.num_subnets):
                masks.set_subnet(k)
                if norm_states is None and calibration is not None and norm_layers(model):
                    load_norm_state(model, saved)
                    recalibrate_norms(model, calibration)
                accs.append(accuracy_on(model, data))
    finally:
        load_norm_state(model, saved)
    return accs


def finetune_norms(
    model: nn.Module,
    allocation: Allocation,
    data: TensorData,
    config: DressConfig,
    calibration: TensorData | None = None,
) -> list[dict[str, torch.Tensor]]:
    """§3.3.5 / Alg. 3.1 lines 18-20: per subnet, train only the norm layers of ``w ⊙ m_k``,
    starting each time from the shared norms. The model keeps its shared norms afterwards.

    Running statistics are re-estimated on ``calibration`` (default: ``data``) before and after
    the SGD epochs on the affine parameters. The thesis fine-tunes for as long as it trains;
    with a short budget the momentum-0.1 running averages would still be dominated by the
    shared statistics, which fit a 95%-sparse subnet badly (we saw 80% -> 35% accuracy)."""
    norms = norm_layers(model)
    if not norms:
        raise DressError("model has no normalisation layers to fine-tune")
    norm_params = {id(p) for m in norms.values() for p in m.parameters()}
    frozen = [p for p in model.parameters() if id(p) not in norm_params and p.requires_grad]
    shared = norm_state(model)
    states = []
    for p in frozen:
        p.requires_grad_(False)
    try:
        with SubnetMasks(model, allocation) as masks:
            for k in range(allocation.num_subnets):
                masks.set_subnet(k)
                load_norm_state(model, shared)
                recalibrate_norms(model, calibration or data)
                params = [p for m in norms.values() for p in m.parameters()]
                sgd_epochs(
                    model,
                    cross_entropy,
                    data,
                    config.norm_epochs,
                    config,
                    params=params,
                    seed_offset=1000 + k,
                )
                recalibrate_norms(model, calibration or data)
                states.append(norm_state(model))
    finally:
        for p in frozen:
            p.requires_grad_(True)
        load_norm_state(model, shared)
    return states


def train_dress(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    config: DressConfig = DressConfig(),
    *,
    device: str | torch.device = "cpu",
    progress: Progress | None = None,
) -> DressResult:
    """Alg. 3.1. Returns the dense backbone of the epoch with the best average validation
    accuracy over the subnets, its allocation, and per-subnet norm states.

    After an epoch without improvement the layer-wise sparsity is re-allocated from the current
    weights' global magnitude order (lines 14-17); masks themselves are re-sampled from the
    current weights at every iteration inside :func:`dress_loss`.
    """
    model.to(device)
    train, val = TensorData(x, y, device), TensorData(x_val, y_val, device)
    report = progress or (lambda stage, epoch, metrics: None)
    history: list[dict[str, object]] = []
    if config.pretrain_epochs:
        loss = sgd_epochs(
            model, cross_entropy, train, config.pretrain_epochs, config,
            end_of_epoch=lambda e: report("pretrain", e, {"val_accuracy": accuracy_on(model, val)}),
        )  # fmt: skip
        history.append({"stage": "pretrain", "loss": loss, "val_accuracy": accuracy_on(model, val)})

    def current_allocation() -> Allocation:
        weights = {k: w.detach() for k, w in backbone_weights(model).items()}
        costs = layer_costs(model, x.shape[1:]) if config.allocation == "latency" else None
        return allocate_sparsity(weights, config.sparsities, config.allocation, costs=costs)

    state = _Stage2(alloc=current_allocation())
    # The thesis does not say which norm statistics stage-2 validation uses. Running statistics
    # shared by K subnets fit none of them (sparse subnets lose 20-30 points on a small CNN until
    # §3.3.5 fixes it), which would make line 14's "higher average accuracy" test mostly noise;
    # so each subnet is validated with statistics re-estimated on a fixed training subset.
    calib_order = np.random.Generator(np.random.PCG64(config.seed)).permutation(len(train))
    calib_idx = torch.as_tensor(calib_order[:CALIBRATION_SAMPLES], device=train.y.device)
    calibration = TensorData(train.x[calib_idx], train.y[calib_idx], device)

    def loss_fn(m: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return dress_loss(m, xb, yb, gamma=config.gamma, allocation=state.alloc)

    def end_of_epoch(epoch: int) -> None:
        accs = evaluate_subnets(model, state.alloc, val, calibration=calibration)
        avg = sum(accs) / len(accs)
        improved = avg > state.best  # Alg. 3.1 line 14: strictly higher, else re-allocate
        if improved:
            state.best, state.best_state = avg, clone_state(model.state_dict())
            state.best_alloc = state.alloc
        else:
            state.alloc = current_allocation()
        history.append(
            {"stage": "dress", "epoch": epoch, "val_accuracy": accs, "reallocated": not improved}
        )
        report("dress", epoch, {"val_accuracy_mean": avg, "reallocated": float(not improved)})

    sgd_epochs(
        model, loss_fn, train, config.epochs, config, end_of_epoch=end_of_epoch, seed_offset=1
    )
    assert state.best_state is not None and state.best_alloc is not None  # epochs >= 1
    model.load_state_dict(state.best_state)
    allocation = state.best_alloc
    norm_states = None
    if norm_layers(model):  # with norm_epochs=0 this only re-estimates statistics per subnet
        norm_states = finetune_norms(model, allocation, train, config, calibration)
        norm_states = [{k: v.to("cpu") for k, v in s.items()} for s in norm_states]
    accs = evaluate_subnets(model, allocation, val, norm_states)
    history.append({"stage": "norms", "val_accuracy": accs})
    report("norms", 0, {"val_accuracy_mean": sum(accs) / len(accs)})
    return DressResult(clone_state(model.state_dict()), allocation, norm_states, accs, history)
