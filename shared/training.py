"""Plain supervised training (on the shared loop, :mod:`shared.loop`) and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.loop import (
    ProgressFn,
    Validation,
    cross_entropy,
    epoch_batches,
    run_loop,
    steps_per_epoch,
)
from shared.tensors import to_model_input


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 5  # passes over the training set
    batch_size: int = 64
    lr: float = 1e-3  # Adam step size
    weight_decay: float = 0.0
    seed: int = 0  # minibatch order

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.weight_decay < 0:
            raise ValueError(f"invalid training config {self}")


def batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Index batches covering ``range(n)``; shuffled when ``rng`` is given. A trailing batch of
    one sample joins the previous one (the shared tail rule, :func:`shared.loop.epoch_batches`)."""
    return epoch_batches(n, batch_size, rng)


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    was_training = model.training
    model.eval()
    outs = [model(to_model_input(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy in [0, 1] (0 for an empty set)."""
    if len(y) == 0:
        return 0.0
    pred = predict_logits(model, x).argmax(dim=1).numpy()
    return float((pred == np.asarray(y)).mean())


def train_supervised(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    *,
    x_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, float]:
    """Train ``model`` in place with Adam and cross-entropy; keeps the best-validation weights.

    Runs on :func:`shared.loop.run_loop`: validation once per epoch (ties prefer the later
    epoch), ``progress(step, total, {"loss", "val_accuracy" at epoch ends})`` after every step,
    any sample count (the one-sample tail rule). Returns ``{"train_loss", "val_accuracy"}``:
    the last epoch's mean loss and the kept weights' accuracy (-1 without a validation set,
    in which case the last weights are kept). A non-finite loss raises
    :class:`shared.loop.TrainingDivergedError`.
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    if len(x) != len(y):
        raise ValueError(f"need equally many inputs and labels, got {len(x)} and {len(y)}")
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return to_model_input(x[idx]), y_t[idx]

    validation = None
    if x_val is not None and y_val is not None and len(y_val) > 0:
        xv, yv = x_val, y_val
        validation = Validation(lambda m: accuracy(m, xv, yv))  # once per epoch
    out = run_loop(
        model, opt, cross_entropy, fetch, len(x),
        batch_size=config.batch_size,
        num_steps=config.epochs * steps_per_epoch(len(x), config.batch_size),
        rng=np.random.Generator(np.random.PCG64(config.seed)),
        validation=validation, progress=progress, context="supervised training (Adam)",
    )  # fmt: skip
    if out.best_state is not None:
        model.load_state_dict(out.best_state)
    best = out.best_metric if out.best_state is not None else -1.0
    return {"train_loss": out.epoch_loss, "val_accuracy": best}
