"""One server round of Deep Partial Updating (Alg. 5.2) and its baselines, as a function."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from shared.dpu.config import DPUConfig, DPUConfigError
from shared.dpu.loop import LossFn, MetricFn, ProgressFn, cross_entropy_loss, top1_accuracy
from shared.dpu.reinit import seeded_state, should_reinitialize
from shared.dpu.selection import ParamFilter, partial_parameter_names
from shared.dpu.steps import Candidate, StepCounter, run_candidate
from shared.tensors import clone_state

ArrayLike = np.ndarray | torch.Tensor


@dataclass
class ShadowChain:
    """A re-initialised training chain that devices do not run yet (§5.5.3).

    It starts from the weights of ``seed`` and is partially updated every round next to the
    deployed chain. When it beats the deployed model on validation it is shipped whole, as a
    diff against the seeded weights. The server stores it between rounds (one state dict).
    """

    seed: int
    state: dict[str, torch.Tensor]
    rounds: int = 0  # rounds trained so far


@dataclass
class PartialUpdateResult:
    """What a round produced. Ship ``diff(diff_base -> state)`` unless ``skipped``.

    ``diff_base`` is what the device must hold before applying the update. That is the
    deployed ``base_state``, or, when ``reinit_seed`` is set, the weights regenerated from
    that seed: the device runs ``init_weights_from_seed(model, reinit_seed)`` first. For the
    magnitude-pruning baseline the partial tensors of ``diff_base`` are zero, because a
    pruned model is shipped as its non-zeros. All tensors are CPU copies.
    """

    state: dict[str, torch.Tensor]  # what the device holds after the round (base if skipped)
    candidate_state: dict[str, torch.Tensor]  # best trained state, also when skipped
    diff_base: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]  # partial tensor name -> bool: weights the update may change
    partial_names: tuple[str, ...]
    method: str
    k: float  # requested updating ratio
    k_effective: float  # nnz / num_partial
    nnz: int  # weights in the mask (k*I; more when a shadow chain of several rounds ships)
    num_partial: int  # I, the number of partially-updated weights
    val_accuracy: float  # of candidate_state
    base_val_accuracy: float  # of the deployed base_state
    skipped: bool
    skip_reason: str | None
    reinit_seed: int | None  # set when the shipped update starts from seeded random weights
    reinit_started: bool  # a re-initialisation began this round (resets n_at_last_init)
    shadow: ShadowChain | None  # pass back as ``shadow=`` next round
    n_train: int  # |D^r|
    steps: int  # optimizer steps run in total
    notes: list[str] = field(default_factory=list)

    @property
    def action(self) -> str:
        return "skip" if self.skipped else "ship"

    def next_n_at_last_init(self, previous: int | None) -> int | None:
        """The ``n_at_last_init`` to pass next round (§5.4.2 bookkeeping)."""
        return self.n_train if self.reinit_started else previous


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
    shadow: ShadowChain | None = None,
) -> PartialUpdateResult:
    """Retrain the deployed ``base_state`` on ``(x, y)`` = D^r and choose what to ship.

    ``config.method`` picks the algorithm:

    - "dpu": Alg. 5.2.
    - "gcpu": Alg. 5.1.
    - "rpu": a random mask.
    - "magnitude": train from w^0, prune the weights themselves and rewind the pruned ones to
      zero [RFC20]. It always re-initialises.
    - "full": update every weight.

    All masked methods train every weight for Q steps (step 1) and keep the top
    ``round(k * I)`` by score over the whole model. They rewind the rest, then fine-tune
    sparsely (step 2) from ``w + dw^f * m`` with the same schedule, keeping the
    best-validation checkpoint.

    Arguments:
        model: the architecture, used as workspace (on return it holds ``result.state``);
            training runs on its device.
        x, y, x_val, y_val: labelled data as stored (e.g. uint8 images) and int labels.
        loss_fn: ``loss_fn(model, x_batch, y_batch) -> scalar`` on the model's device;
            default cross-entropy of ``model(to_model_input(x))``.
        progress: ``progress(step, total, metrics)`` after every optimizer step. ``total``
            grows when a second candidate is trained (shadow chain or fallback).
        param_filter: ``(name, param) -> bool`` picks the partially-updated tensors. The
            default is conv/fc weights (dim > 1 and not a normalisation layer).
        metric_fn: validation metric, higher is better (default top-1 accuracy).
        n_at_last_init, reinit, reinit_seed, shadow: re-initialisation (§5.4.2).
            ``reinit=None`` applies :func:`should_reinitialize` to ``len(x)`` and
            ``n_at_last_init``, with no re-initialisation when that is None. ``reinit=False``
            never re-initialises. ``reinit=True`` trains this round from the weights of
            ``reinit_seed`` and ships if that beats the deployed model. ``reinit_seed``
            defaults to ``config.init_seed``, the same w^0 every time (§5.5.2 (ii)).

    A re-initialisation triggered by the rule proceeds by ``config.reinit_mode``:

    - "shadow" (§5.5.3): a :class:`ShadowChain` starts from the seed. From then on every
      round also partially updates the shadow chain, next to the deployed chain. The shadow
      chain ships, as a diff against the seeded weights plus the seed, once it beats both the
      deployed model and this round's deployed-chain candidate. The caller passes
      ``result.shadow`` back next round. Deviation: the thesis ships the shadow chain's
      sparse updates to devices every round; here they are held back and shipped together on
      promotion, so devices hold a single model.
    - "fallback": train from the seeded weights; if that loses, retrain from the deployed
      weights instead.

    Skip-if-worse (§5.5): unless the shipped candidate's validation metric strictly beats the
    deployed model's, ``skipped`` is True, ``state`` is ``base_state`` and nothing should be
    shipped.
    """
    loss_fn = loss_fn or cross_entropy_loss
    metric_fn = metric_fn or top1_accuracy
    device = next(model.parameters()).device
    names = partial_parameter_names(model, param_filter)
    if not names:
        raise DPUConfigError("param_filter selected no partially-updated tensors")
    _check_state(model, base_state, "base_state")
    if shadow is not None:
        _check_state(model, shadow.state, "shadow.state")
    x_t, y_t = _as_tensors(x, y, device, "training")
    xv_t, yv_t = _as_tensors(x_val, y_val, device, "validation")
    if reinit_seed is not None and not 0 <= reinit_seed < 2**63:
        raise DPUConfigError(f"reinit_seed={reinit_seed} must lie in [0, 2**63)")
    seed = config.init_seed if reinit_seed is None else reinit_seed
    base = clone_state(base_state)
    model.load_state_dict(base)
    base_val = float(metric_fn(model, xv_t, yv_t))

    auto = reinit is None and config.method != "magnitude"
    if config.method == "magnitude":
        reinit = True  # [RFC20] prunes a model trained from w^0, every round
    elif auto:
        reinit = n_at_last_init is not None and should_reinitialize(len(x_t), n_at_last_init)
    q = config.num_steps(len(x_t)) * (1 if config.method == "full" else 2)
    counter = StepCounter(progress, q)

    def run(start: dict[str, torch.Tensor]) -> Candidate:
        return run_candidate(model, start, names, x_t, y_t, (xv_t, yv_t, metric_fn), config,
                             loss_fn, counter)  # fmt: skip

    def beats(c: Candidate) -> bool:
        return not config.skip_if_worse or c.val > base_val

    notes: list[str] = []
    used_seed = None
    if reinit and (not auto or config.reinit_mode == "fallback"):
        chosen = run(seeded_state(model, seed))
        used_seed = seed
        if auto and not beats(chosen):
            notes.append(
                f"re-initialised candidate (seed {seed}) reached validation {chosen.val:.4f}, "
                f"not above the deployed {base_val:.4f}; retrained from the deployed weights"
            )
            counter.total += q
            warm = run(base)
            if beats(warm) or warm.val > chosen.val:
                chosen, used_seed = warm, None
    else:
        if reinit:  # shadow mode: a fresh chain from the seed
            if shadow is not None:
                notes.append(f"replaced the shadow chain of {shadow.rounds} rounds")
            shadow = ShadowChain(seed, seeded_state(model, seed))
        chosen = run(base)
        if shadow is not None:
            counter.total += q
            chosen, shadow, used_seed = _advance_shadow(
                model, shadow, run(shadow.state), chosen, beats, base_val, names, notes
            )

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
        reinit_started=bool(reinit),
        shadow=shadow,
        n_train=len(x_t),
        steps=counter.done,
        notes=notes,
    )


def _advance_shadow(
    model: nn.Module,
    shadow: ShadowChain,
    trained: Candidate,
    warm: Candidate,
    beats: Callable[[Candidate], bool],
    base_val: float,
    names: tuple[str, ...],
    notes: list[str],
) -> tuple[Candidate, ShadowChain | None, int | None]:
    """Keep the shadow chain's new weights; promote it when it beats the deployed model and
    the deployed chain's own candidate (§5.5.3)."""
    if trained.val > base_val and (not beats(warm) or trained.val > warm.val):
        seeded = seeded_state(model, shadow.seed)
        # Every weight the chain moved since the seed, over all its rounds.
        mask = {n: trained.state[n] != seeded[n] for n in names}
        notes.append(
            f"shadow chain (seed {shadow.seed}, {shadow.rounds + 1} rounds) reached validation "
            f"{trained.val:.4f} and replaces the deployed model"
        )
        return Candidate(trained.state, mask, seeded, trained.val), None, shadow.seed
    return warm, ShadowChain(shadow.seed, trained.state, shadow.rounds + 1), None


def _check_state(model: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise DPUConfigError(f"{what} does not fit the model: missing {missing}, extra {extra}")
    shapes = [n for n in expected if tuple(expected[n].shape) != tuple(state[n].shape)]
    if shapes:
        raise DPUConfigError(f"{what} tensors {shapes} differ in shape from the model's")


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
