"""Minimal training/evaluation loops over in-memory tensors, shared by DRESS and its baseline.

``sgd_epochs`` is Nesterov SGD with a cosine learning-rate decay restarted on every call (the
thesis' optimiser, §3.4.1); ``loss_fn(model, x, y)`` decides what is trained, so the same loop
runs dense pre-training, the DRESS objective, norm fine-tuning and pruned fine-tuning. The
loop itself (batching and its tail rule, divergence, hooks) is :mod:`shared.loop`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np
import torch
from torch import nn

from shared.dress.layers import DressError
from shared.dress.masks import norm_layers
from shared.loop import Hooks, LossFn, ProgressFn, epoch_batches, run_loop, steps_per_epoch
from shared.loop import cross_entropy as cross_entropy  # the stages' dense loss, re-exported
from shared.tensors import to_model_input


class OptimSettings(Protocol):
    """What sgd_epochs reads (DressConfig, or any object with these attributes)."""

    @property
    def batch_size(self) -> int: ...
    @property
    def lr(self) -> float: ...
    @property
    def momentum(self) -> float: ...
    @property
    def weight_decay(self) -> float: ...
    @property
    def seed(self) -> int: ...


class TensorData:
    """Inputs and labels as tensors on one device, served in seeded shuffled minibatches."""

    def __init__(
        self, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, device: str | torch.device
    ) -> None:
        if len(x) != len(y) or len(x) == 0:
            raise DressError(f"need equally many inputs and labels (>0), got {len(x)} and {len(y)}")
        self.x = torch.as_tensor(x).to(device)
        self.y = torch.as_tensor(y).to(device=device, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.y)

    def take(self, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The minibatch at ``idx``, inputs scaled by ``to_model_input``."""
        i = torch.as_tensor(idx, device=self.y.device)
        return to_model_input(self.x[i]), self.y[i]

    def batches(
        self, batch_size: int, rng: np.random.Generator | None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One pass, under the shared tail rule (:func:`shared.loop.epoch_batches`)."""
        for idx in epoch_batches(len(self), batch_size, rng):
            yield self.take(idx)


def cosine_lr(lr: float, steps: int) -> Callable[[int], float]:
    """Step ``i`` of ``steps`` gets ``lr * (1 + cos(pi i / steps)) / 2`` (decay to 0)."""
    return lambda i: lr * (0.5 * (1 + math.cos(math.pi * i / steps)))


def sgd_epochs(
    model: nn.Module,
    loss_fn: LossFn,
    data: TensorData,
    epochs: int,
    config: OptimSettings,
    *,
    params: Sequence[torch.nn.Parameter] | None = None,
    end_of_epoch: Callable[[int], None] | None = None,
    seed_offset: int = 0,
    progress: ProgressFn | None = None,
) -> float:
    """``epochs`` passes of Nesterov SGD with a fresh cosine schedule; returns the last mean loss.

    Starting the schedule afresh on every call is what "learning-rate rewinding" means for the
    pruning baseline ([RFC20]); DRESS calls it once per stage. ``epochs=0`` does nothing.
    Batching, the one-sample tail and divergence are :func:`shared.loop.run_loop`'s.
    """
    if epochs <= 0:
        return float("nan")
    params = (
        list(params) if params is not None else [p for p in model.parameters() if p.requires_grad]
    )
    opt = torch.optim.SGD(
        params, lr=config.lr, momentum=config.momentum, nesterov=config.momentum > 0,
        weight_decay=config.weight_decay,
    )  # fmt: skip
    steps = epochs * steps_per_epoch(len(data), config.batch_size)
    out = run_loop(
        model, opt, loss_fn, data.take, len(data),
        batch_size=config.batch_size, num_steps=steps,
        rng=np.random.Generator(np.random.PCG64(config.seed + seed_offset)),
        lr_at=cosine_lr(config.lr, steps), hooks=Hooks(end_of_epoch=end_of_epoch),
        progress=progress, context="SGD epochs",
    )  # fmt: skip
    return out.epoch_loss


@torch.no_grad()
def accuracy_on(model: nn.Module, data: TensorData, batch_size: int = 1024) -> float:
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in data.batches(batch_size, None):
        correct += int((model(xb).argmax(dim=1) == yb).sum())
    model.train(was_training)
    return correct / len(data)


@torch.no_grad()
def recalibrate_norms(model: nn.Module, data: TensorData, batch_size: int = 256) -> None:
    """Re-estimate every norm layer's running statistics on ``data`` (exact averages over the
    batches; affine parameters untouched).

    One sample has no batch variance (BatchNorm refuses it in training mode), so with fewer
    than two samples the statistics are left as they are."""
    if len(data) < 2:
        return
    norms = list(norm_layers(model).values())
    momenta = [m.momentum for m in norms]
    was_training = model.training
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average
    model.train()
    try:
        for xb, _ in data.batches(batch_size, None):
            model(xb)
    finally:
        for m, momentum in zip(norms, momenta, strict=True):
            m.momentum = momentum
        model.train(was_training)
