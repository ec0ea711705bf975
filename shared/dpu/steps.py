"""The two steps of Alg. 5.1/5.2 (and the full-updating baseline) from one starting point."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.dpu.config import DPUConfig, TrainingDivergedError
from shared.dpu.loop import LossFn, MetricFn, PhaseOutcome, ProgressFn, train_phase
from shared.dpu.selection import (
    combined_contribution,
    global_contribution,
    global_topk_mask,
    magnitude_scores,
    random_scores,
)
from shared.tensors import clone_state


@dataclass
class Candidate:
    state: dict[str, torch.Tensor]  # best-validation checkpoint (CPU)
    mask: dict[str, torch.Tensor]  # selected partial weights (CPU bool)
    diff_base: dict[str, torch.Tensor]  # what the shipped diff is relative to
    val: float


class StepCounter:
    """Progress bookkeeping across the phases (and candidates) of one round."""

    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def kwargs(self, phase: int) -> dict:
        return {"progress": self.callback, "step_offset": self.done, "total_steps": self.total,
                "phase": phase}  # fmt: skip


def run_candidate(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    names: tuple[str, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    validation: tuple[torch.Tensor, torch.Tensor, MetricFn],
    config: DPUConfig,
    loss_fn: LossFn,
    counter: StepCounter,
) -> Candidate:
    """Train ``model`` from ``start`` with ``config.method``; see :func:`partial_update`."""
    model.load_state_dict(start)
    params = dict(model.named_parameters())
    partial = {n: params[n] for n in names}
    seeds = np.random.SeedSequence([config.seed, counter.done]).generate_state(2)
    if config.method == "full":
        out = train_phase(model, x, y, config, loss_fn=loss_fn, partial=partial,
                          validation=validation, batch_seed=int(seeds[0]),
                          **counter.kwargs(1))  # fmt: skip
        counter.done += out.steps
        mask = {n: torch.ones_like(start[n], dtype=torch.bool) for n in names}
        return Candidate(_kept(out), mask, start, out.best_metric)

    # Step 1: full updating (Alg. 5.2 lines 1-6), accumulating Eq. 5.9 for DPU.
    out1 = train_phase(model, x, y, config, loss_fn=loss_fn, partial=partial,
                       track_local=config.method == "dpu", batch_seed=int(seeds[0]),
                       **counter.kwargs(1))  # fmt: skip
    counter.done += out1.steps
    w_f = {n: p.detach() for n, p in partial.items()}
    start_dev = {n: start[n].to(w_f[n].device) for n in names}
    if config.method == "dpu":
        assert out1.c_local is not None  # tracked because method == "dpu"
        scores = combined_contribution(out1.c_local, global_contribution(start_dev, w_f))
    elif config.method == "gcpu":
        scores = global_contribution(start_dev, w_f)
    elif config.method == "rpu":
        scores = random_scores({n: w_f[n].shape for n in names}, config.seed)
    else:  # magnitude
        scores = magnitude_scores(w_f)
    mask = global_topk_mask(scores, config.k)

    # Rewind (line 11): unselected weights go back to w (to zero when pruning); dense tensors
    # and buffers keep their step-1 values and keep training.
    if config.method == "magnitude":
        rewind = {n: torch.zeros_like(w_f[n]) for n in names}
    else:
        rewind = start_dev
    mask_dev = {n: m.to(w_f[n].device) for n, m in mask.items()}
    with torch.no_grad():
        for n in names:
            partial[n].copy_(torch.where(mask_dev[n], w_f[n], rewind[n]))

    # Step 2: sparse fine-tuning (lines 12-14) with the same schedule, best checkpoint kept.
    out2 = train_phase(model, x, y, config, loss_fn=loss_fn, partial=partial, masks=mask_dev,
                       validation=validation, batch_seed=int(seeds[1]),
                       **counter.kwargs(2))  # fmt: skip
    counter.done += out2.steps
    diff_base = start
    if config.method == "magnitude":
        diff_base = {n: torch.zeros_like(t) if n in mask else t for n, t in start.items()}
    return Candidate(_kept(out2), mask, diff_base, out2.best_metric)


def _kept(out: PhaseOutcome) -> dict[str, torch.Tensor]:
    """The phase's best-validation checkpoint (CPU); a metric that was NaN at every check
    leaves none, which is a failed round rather than something to ship."""
    if out.best_state is None:
        raise TrainingDivergedError(
            f"the validation metric was NaN at every check of {out.steps} steps; nothing to keep"
        )
    return clone_state(out.best_state)
