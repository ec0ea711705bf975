"""The optimisation loop both steps of Alg. 5.2 share (and the full-updating baseline)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.dpu.config import DPUConfig, TrainingDivergedError, steps_per_epoch
from shared.dpu.masked import MaskedOptimizer
from shared.dpu.selection import accumulate_local_contribution
from shared.tensors import to_model_input

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> loss
MetricFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]  # higher is better
ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total, metrics)


def cross_entropy_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Default loss (§5.5): average cross-entropy of ``model(to_model_input(x))``."""
    return F.cross_entropy(model(to_model_input(x)), y)


@torch.no_grad()
def top1_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024
) -> float:
    """Default validation metric: top-1 accuracy in [0, 1], evaluated in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for i in range(0, len(x), batch_size):
        pred = model(to_model_input(x[i : i + batch_size])).argmax(dim=1)
        correct += int((pred == y[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


def make_optimizer(config: DPUConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(
        params,
        lr=config.lr,
        momentum=config.momentum,
        nesterov=config.nesterov,
        weight_decay=config.weight_decay,
    )


def lr_at(config: DPUConfig, step: int, total: int) -> float:
    """alpha^q: step decay by ``lr_gamma`` at each milestone fraction of the Q steps."""
    passed = sum(1 for m in config.lr_milestones if step >= round(m * total))
    return config.lr * config.lr_gamma**passed


def minibatches(n: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Endless shuffled epochs; a trailing single-sample batch joins the previous batch."""
    rng = np.random.Generator(np.random.PCG64(seed))
    while True:
        order = rng.permutation(n)
        cuts = list(range(0, n, batch_size))
        if len(cuts) > 1 and n - cuts[-1] == 1:
            cuts.pop()
        for i, start in enumerate(cuts):
            end = cuts[i + 1] if i + 1 < len(cuts) else n
            yield order[start:end]


@dataclass
class PhaseOutcome:
    steps: int
    last_loss: float
    best_metric: float  # -inf when the phase kept no checkpoint
    best_state: dict[str, torch.Tensor] | None  # on the model's device
    c_local: dict[str, torch.Tensor] | None  # Eq. 5.9, when tracked


def train_phase(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    config: DPUConfig,
    *,
    loss_fn: LossFn,
    partial: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor] | None = None,
    track_local: bool = False,
    validation: tuple[torch.Tensor, torch.Tensor, MetricFn] | None = None,
    batch_seed: int = 0,
    progress: ProgressFn | None = None,
    step_offset: int = 0,
    total_steps: int = 0,
    phase: int = 1,
) -> PhaseOutcome:
    """Run Q optimizer steps on ``model`` in place.

    ``partial`` maps names to the partially-updated parameters. With ``masks`` only their masked
    entries move (:class:`MaskedOptimizer`); with ``track_local`` Eq. 5.9 is accumulated for
    them from each step's gradient and actual parameter change; with ``validation`` the
    checkpoint with the best metric (evaluated once per epoch or every ``eval_every`` steps and
    after the last step) is returned.
    """
    q_total = config.num_steps(len(x))
    optimizer: torch.optim.Optimizer | MaskedOptimizer = make_optimizer(
        config, [p for p in model.parameters() if p.requires_grad]
    )
    if masks is not None:
        optimizer = MaskedOptimizer(optimizer, [(partial[n], masks[n]) for n in masks])
    c_local = (
        {n: torch.zeros_like(p, dtype=torch.float32) for n, p in partial.items()}
        if track_local
        else {}
    )
    eval_every = config.eval_every or steps_per_epoch(len(x), config.batch_size)
    best_metric, best_state, last_loss = -math.inf, None, float("nan")
    batches = minibatches(len(x), config.batch_size, batch_seed)
    model.train()
    for q in range(q_total):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(config, q, q_total)
        idx = torch.from_numpy(next(batches)).to(x.device)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, x[idx], y[idx])
        evaluate = validation is not None and ((q + 1) % eval_every == 0 or q + 1 == q_total)
        if progress is not None or evaluate or q + 1 == q_total:
            # Reading the loss is a device sync, so it is done only when someone looks at it.
            last_loss = float(loss.detach())
            if not math.isfinite(last_loss):
                raise TrainingDivergedError(
                    f"loss is {last_loss} at step {q + 1}/{q_total} of phase {phase} "
                    f"(lr={config.lr}, optimizer={config.optimizer})"
                )
        loss.backward()
        if track_local:
            before = {n: p.detach().clone() for n, p in partial.items()}
            grads = {n: p.grad.detach().clone() for n, p in partial.items() if p.grad is not None}
        optimizer.step()
        if track_local:
            deltas = {n: p.detach() - before[n] for n, p in partial.items()}
            accumulate_local_contribution(c_local, grads, deltas)
        metrics = {"phase": float(phase), "loss": last_loss}
        if evaluate:
            x_val, y_val, metric_fn = validation
            value = float(metric_fn(model, x_val, y_val))
            metrics["val_accuracy"] = value
            if value >= best_metric:  # ties prefer the later, longer-trained checkpoint
                best_metric = value
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            model.train()
        if progress is not None:
            progress(step_offset + q + 1, total_steps, metrics)
    return PhaseOutcome(
        steps=q_total,
        last_loss=last_loss,
        best_metric=best_metric,
        best_state=best_state,
        c_local=c_local if track_local else None,
    )
