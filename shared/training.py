"""Plain supervised training and evaluation loops over in-memory tensors."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.tensors import to_model_input

ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total_steps, metrics)


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
    """Index batches covering ``range(n)``; shuffled when ``rng`` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


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

    Returns ``{"train_loss", "val_accuracy"}`` of the kept weights (val_accuracy is -1 without a
    validation set, in which case the last weights are kept).
    """
    if len(x) == 0:
        raise ValueError("cannot train on an empty dataset")
    rng = np.random.Generator(np.random.PCG64(config.seed))
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    loss_fn = nn.CrossEntropyLoss()
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    steps_per_epoch = (len(x) + config.batch_size - 1) // config.batch_size
    total = steps_per_epoch * config.epochs
    has_val = x_val is not None and y_val is not None and len(y_val) > 0
    best_acc, best_state, last_loss, step = -1.0, None, float("nan"), 0
    for _epoch in range(config.epochs):
        model.train()
        running = 0.0
        for idx in batches(len(x), config.batch_size, rng):
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(to_model_input(x[idx])), y_t[idx])
            loss.backward()
            opt.step()
            running += loss.item() * len(idx)
            step += 1
            if progress is not None:
                progress(step, total, {"loss": loss.item()})
        last_loss = running / len(x)
        if has_val:
            acc = accuracy(model, x_val, y_val)
            if acc > best_acc:
                best_acc = acc
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"train_loss": last_loss, "val_accuracy": best_acc}
