"""Both steps of Alg. 5.2 (and the full-updating baseline) as one phase on the shared loop.

The loop itself (batching, tail rule, validation, divergence) is :mod:`shared.loop`; this
module adds DPU's choices: the optimizer, the step-decay schedule alpha^q, the masked
optimizer of step 2 and the Eq. 5.9 tracking of step 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.dpu.config import DPUConfig
from shared.dpu.masked import MaskedOptimizer
from shared.dpu.selection import accumulate_local_contribution
from shared.loop import Hooks, LossFn, ProgressFn, Validation, run_loop
from shared.tensors import to_model_input

MetricFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]  # higher is better


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
    """Run Q optimizer steps on ``model`` in place (one step of Alg. 5.2) on
    :func:`shared.loop.run_loop`.

    ``partial`` maps names to the partially-updated parameters. With ``masks`` only their masked
    entries move (:class:`MaskedOptimizer`); with ``track_local`` Eq. 5.9 is accumulated for
    them from each step's gradient and actual parameter change; with ``validation`` the
    checkpoint with the best metric (evaluated once per epoch or every ``eval_every`` steps and
    after the last step) is returned.
    """
    q_total = config.num_steps(len(x))
    base = make_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    optimizer: torch.optim.Optimizer | MaskedOptimizer = base
    if masks is not None:
        optimizer = MaskedOptimizer(base, [(partial[n], masks[n]) for n in masks])
    c_local = (
        {n: torch.zeros_like(p, dtype=torch.float32) for n, p in partial.items()}
        if track_local
        else {}
    )
    hooks = Hooks()
    if track_local:
        # Eq. 5.9: -g(w^q) * (w^{q+1} - w^q) summed over the steps, with the gradient taken
        # before the (masked) optimizer edits it and the change the optimizer actually made.
        seen: dict[str, dict[str, torch.Tensor]] = {}

        def before(_step: int) -> None:
            seen["w"] = {n: p.detach().clone() for n, p in partial.items()}
            seen["g"] = {
                n: p.grad.detach().clone() for n, p in partial.items() if p.grad is not None
            }

        def after(_step: int) -> None:
            deltas = {n: p.detach() - seen["w"][n] for n, p in partial.items()}
            accumulate_local_contribution(c_local, seen["g"], deltas)

        hooks = Hooks(before_step=before, after_step=after)
    checks = None
    if validation is not None:
        x_val, y_val, metric_fn = validation
        checks = Validation(lambda m: metric_fn(m, x_val, y_val), every=config.eval_every)
    index_device = x.device

    def fetch(idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        i = torch.from_numpy(idx).to(index_device)
        return x[i], y[i]

    out = run_loop(
        model, optimizer, loss_fn, fetch, len(x),
        batch_size=config.batch_size, num_steps=q_total,
        rng=np.random.Generator(np.random.PCG64(batch_seed)),
        lr_at=lambda q: lr_at(config, q, q_total),
        validation=checks, hooks=hooks,
        progress=progress, progress_offset=step_offset, progress_total=total_steps,
        progress_extra={"phase": float(phase)},
        context=f"phase {phase} (lr={config.lr}, optimizer={config.optimizer})",
    )  # fmt: skip
    return PhaseOutcome(
        steps=q_total,
        last_loss=out.last_loss,
        best_metric=out.best_metric,
        best_state=out.best_state,
        c_local=c_local if track_local else None,
    )
