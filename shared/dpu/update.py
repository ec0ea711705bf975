"""One server round of Deep Partial Updating (Alg. 5.2) and its baselines, as a function."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shared.dpu.config import DPUConfig, DPUConfigError
from shared.dpu.loop import (
    LossFn,
    MetricFn,
    ProgressFn,
    cross_entropy_loss,
    top1_accuracy,
    train_phase,
)
from shared.dpu.reinit import seeded_state, should_reinitialize
from shared.dpu.selection import (
    ParamFilter,
    combined_contribution,
    global_contribution,
    global_topk_mask,
    magnitude_scores,
    partial_parameter_names,
    random_scores,
)
from shared.tensors import clone_state

ArrayLike = np.ndarray | torch.Tensor


@dataclass
class PartialUpdateResult:
    """What a round produced. Ship ``diff(diff_base -> state)`` unless ``skipped``.

    ``diff_base`` is what the device must hold before applying the update: the deployed
    ``base_state``, or, when ``reinit_seed`` is set, the weights regenerated from that seed
    (the device runs ``init_weights_from_seed(model, reinit_seed)`` first). For the magnitude-
    pruning baseline the partial tensors of ``diff_base`` are zero (a pruned model is shipped
    as its non-zeros). All tensors are CPU copies.
    """

    state: dict[str, torch.Tensor]  # what the device holds after the round (base if skipped)
    candidate_state: dict[str, torch.Tensor]  # best trained state, also when skipped
    diff_base: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]  # partial tensor name -> bool mask (all True for "full")
    partial_names: tuple[str, ...]
    method: str
    k: float  # requested updating ratio
    k_effective: float  # nnz / num_partial
    nnz: int  # selected partial weights
    num_partial: int  # I, the number of partially-updated weights
    val_accuracy: float  # of candidate_state
    base_val_accuracy: float  # of the deployed base_state
    skipped: bool
    skip_reason: str | None
    reinit_seed: int | None  # set when the shipped update starts from seeded random weights
    reinit_attempted: bool  # a re-initialised candidate was trained (shipped or not)
    n_train: int  # |D^r|
    steps: int  # optimizer steps run in total
    notes: list[str] = field(default_factory=list)

    @property
    def action(self) -> str:
        return "skip" if self.skipped else "ship"

    def next_n_at_last_init(self, previous: int | None) -> int | None:
        """The ``n_at_last_init`` to pass next round (§5.4.2 bookkeeping)."""
        return self.n_train if self.reinit_seed is not None and not self.skipped else previous


@dataclass
class _Candidate:
    state: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    diff_base: dict[str, torch.Tensor]
    val: float
    steps: int


class _Progress:
    def __init__(self, callback: ProgressFn | None, total: int) -> None:
        self.callback, self.total, self.done = callback, total, 0

    def kwargs(self, phase: int) -> dict:
        return {"progress": self.callback, "step_offset": self.done, "total_steps": self.total,
                "phase": phase}  # fmt: skip


def partial_update(
    model: nn.Module,
    base_state: Mapping[str, torch.Tensor],
    x: ArrayLike,
    y: ArrayLike,
    x_val: ArrayLike,
    y_val: ArrayLike,
    config: DPUConfig,
    loss_fn: LossFn | None = None,
    progress: ProgressFn | None = None,
    *,
    param_filter: ParamFilter | None = None,
    metric_fn: MetricFn | None = None,
    n_at_last_init: int | None = None,
    reinit: bool | None = None,
    reinit_seed: int | None = None,
) -> PartialUpdateResult:
    """Retrain the deployed ``base_state`` on ``(x, y)`` = D^r and choose what to ship.

    ``config.method`` picks the algorithm: "dpu" (Alg. 5.2), "gcpu" (Alg. 5.1), "rpu" (random
    mask), "magnitude" (prune the weights, rewind pruned ones to zero [RFC20]) or "full". All
    masked methods train all weights for Q steps (step 1), keep the top ``round(k * I)`` by
    their score over the whole model, rewind the rest and sparsely fine-tune (step 2) from
    ``w + dw^f * m`` with the same schedule, keeping the best-validation checkpoint.

    Arguments:
        model: the architecture, used as workspace (on return it holds ``result.state``);
            training runs on its device.
        x, y, x_val, y_val: labelled data as stored (e.g. uint8 images) and int labels.
        loss_fn: ``loss_fn(model, x_batch, y_batch) -> scalar`` on the model's device;
            default cross-entropy of ``model(to_model_input(x))``.
        progress: ``progress(step, total, metrics)`` after every optimizer step; ``total``
            grows once if a re-initialised candidate falls back (see below).
        param_filter: ``(name, param) -> bool`` picks the partially-updated tensors; default
            conv/fc weights (dim > 1 and not a normalisation layer).
        metric_fn: validation metric, higher is better (default top-1 accuracy).
        n_at_last_init, reinit, reinit_seed: re-initialisation (§5.4.2). ``reinit=None``
            applies :func:`should_reinitialize` to ``len(x)`` and ``n_at_last_init`` (no
            re-init when that is None); True/False force it. The round then starts from the
            weights of ``reinit_seed`` (default ``config.init_seed``, the same w^0 every time,
            §5.5.2 (ii)).

    Skip-if-worse (§5.5): unless the candidate's validation metric strictly beats the deployed
    model's, ``skipped`` is True, ``state`` is ``base_state`` and nothing should be shipped.
    Deviation: the thesis keeps training an unshipped re-initialised chain; we ship exactly what
    the device will run, so when an automatically triggered re-initialisation does not beat
    the deployed model (and ``config.reinit_fallback``), the round is retrained from the
    deployed weights instead and the re-initialisation is retried next round.
    """
    loss_fn = loss_fn or cross_entropy_loss
    metric_fn = metric_fn or top1_accuracy
    device = next(model.parameters()).device
    names = partial_parameter_names(model, param_filter)
    if not names:
        raise DPUConfigError("param_filter selected no partially-updated tensors")
    _check_state(model, base_state)
    x_t, y_t = _as_tensors(x, y, device, "training")
    xv_t, yv_t = _as_tensors(x_val, y_val, device, "validation")
    base = clone_state(base_state)

    model.load_state_dict(base)
    base_val = float(metric_fn(model, xv_t, yv_t))

    auto = reinit is None
    if auto:
        reinit = n_at_last_init is not None and should_reinitialize(len(x_t), n_at_last_init)
    if reinit_seed is not None and not 0 <= reinit_seed < 2**63:
        raise DPUConfigError(f"reinit_seed={reinit_seed} must lie in [0, 2**63)")
    seed = config.init_seed if reinit_seed is None else reinit_seed
    phases = 1 if config.method == "full" else 2
    q = config.num_steps(len(x_t))
    tracker = _Progress(progress, phases * q)

    def run(start: dict[str, torch.Tensor]) -> _Candidate:
        return _run_candidate(model, start, names, x_t, y_t, (xv_t, yv_t, metric_fn), config,
                              loss_fn, tracker)  # fmt: skip

    def beats(c: _Candidate) -> bool:
        return not config.skip_if_worse or c.val > base_val

    notes: list[str] = []
    attempted = bool(reinit)
    chosen = run(seeded_state(model, seed) if reinit else base)
    used_seed = seed if reinit else None
    if reinit and not beats(chosen) and auto and config.reinit_fallback:
        notes.append(
            f"re-initialised candidate (seed {seed}) reached validation {chosen.val:.4f}, not "
            f"above the deployed {base_val:.4f}; retrained from the deployed weights"
        )
        tracker.total += phases * q
        warm = run(base)
        if beats(warm) or warm.val > chosen.val:
            chosen, used_seed = warm, None
    skipped = not beats(chosen)
    reason = None
    if skipped:
        reason = (
            f"validation accuracy {chosen.val:.4f} does not beat the deployed model's "
            f"{base_val:.4f}"
        )
    final = base if skipped else chosen.state
    model.load_state_dict(final)
    nnz = int(sum(int(m.sum()) for m in chosen.mask.values()))
    num_partial = sum(base[n].numel() for n in names)
    return PartialUpdateResult(
        state=final,
        candidate_state=chosen.state,
        diff_base=base if skipped else chosen.diff_base,
        mask=chosen.mask,
        partial_names=names,
        method=config.method,
        k=config.k,
        k_effective=nnz / num_partial,
        nnz=nnz,
        num_partial=num_partial,
        val_accuracy=chosen.val,
        base_val_accuracy=base_val,
        skipped=skipped,
        skip_reason=reason,
        reinit_seed=None if skipped else used_seed,
        reinit_attempted=attempted,
        n_train=len(x_t),
        steps=tracker.done,
        notes=notes,
    )


def _run_candidate(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    names: tuple[str, ...],
    x: torch.Tensor,
    y: torch.Tensor,
    validation: tuple,
    config: DPUConfig,
    loss_fn: LossFn,
    tracker: _Progress,
) -> _Candidate:
    """Both steps of Alg. 5.1/5.2 (or one full-updating phase) from ``start``."""
    model.load_state_dict(start)
    params = dict(model.named_parameters())
    partial = {n: params[n] for n in names}
    seeds = np.random.SeedSequence([config.seed, tracker.done]).generate_state(2)
    if config.method == "full":
        out = train_phase(model, x, y, config, loss_fn=loss_fn, partial=partial,
                          validation=validation, batch_seed=int(seeds[0]),
                          **tracker.kwargs(1))  # fmt: skip
        tracker.done += out.steps
        mask = {n: torch.ones_like(start[n], dtype=torch.bool) for n in names}
        return _Candidate(clone_state(out.best_state), mask, start, out.best_metric, out.steps)

    # Step 1: full updating (Alg. 5.2 lines 1-6), accumulating Eq. 5.9 for DPU.
    out1 = train_phase(model, x, y, config, loss_fn=loss_fn, partial=partial,
                       track_local=config.method == "dpu", batch_seed=int(seeds[0]),
                       **tracker.kwargs(1))  # fmt: skip
    tracker.done += out1.steps
    w_f = {n: p.detach() for n, p in partial.items()}
    start_dev = {n: start[n].to(w_f[n].device) for n in names}
    if config.method == "dpu":
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
    rewind = (
        start_dev if config.method != "magnitude" else {n: torch.zeros_like(w_f[n]) for n in names}
    )
    mask_dev = {n: m.to(w_f[n].device) for n, m in mask.items()}
    with torch.no_grad():
        for n in names:
            partial[n].copy_(torch.where(mask_dev[n], w_f[n], rewind[n]))

    # Step 2: sparse fine-tuning (lines 12-14) with the same schedule, best checkpoint kept.
    out2 = train_phase(model, x, y, config, loss_fn=loss_fn, partial=partial, masks=mask_dev,
                       validation=validation, batch_seed=int(seeds[1]),
                       **tracker.kwargs(2))  # fmt: skip
    tracker.done += out2.steps
    diff_base = start
    if config.method == "magnitude":
        diff_base = {n: torch.zeros_like(t) if n in mask else t for n, t in start.items()}
    return _Candidate(
        clone_state(out2.best_state), mask, diff_base, out2.best_metric, out1.steps + out2.steps
    )


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise DPUConfigError(f"base_state does not fit the model: missing {missing}, extra {extra}")
    shapes = [n for n in expected if tuple(expected[n].shape) != tuple(state[n].shape)]
    if shapes:
        raise DPUConfigError(f"base_state tensors {shapes} differ in shape from the model's")


def _as_tensors(
    x: ArrayLike, y: ArrayLike, device: torch.device, what: str
) -> tuple[torch.Tensor, torch.Tensor]:
    x_t = torch.as_tensor(x).to(device)
    y_t = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y).to(device)
    if x_t.dim() < 2 or y_t.dim() != 1 or len(x_t) != len(y_t):
        raise DPUConfigError(
            f"{what} data must be (N, ...) inputs and N labels, got {tuple(x_t.shape)} and "
            f"{tuple(y_t.shape)}"
        )
    if len(x_t) == 0:
        raise DPUConfigError(f"{what} data is empty")
    if y_t.is_floating_point():
        raise DPUConfigError(f"{what} labels must be integers, got {y_t.dtype}")
    return x_t, y_t.long()
