"""The one optimisation loop every trainer in ``shared/`` runs on.

Plain supervised training (``shared.training``), the DRESS stages and the pruning baseline
(``shared.dress.loops.sgd_epochs``, thesis Alg. 3.1 / §3.4.2.3) and both steps of Deep Partial
Updating (``shared.dpu.loop.train_phase``, Alg. 5.2) are thin wrappers that choose the
optimizer, the learning-rate schedule, the loss and the hooks; this module owns what they must
agree on:

- **batching**: seeded shuffled epochs, one tail rule (:func:`epoch_batches`);
- **a batch of one sample** trains with BatchNorm layers in eval mode (:func:`_one_sample_norms`);
- **validation** every N steps (default once per epoch) and after the last step, keeping the
  best checkpoint, ties to the later one;
- **divergence**: a non-finite loss raises :class:`TrainingDivergedError`, and so does a loss
  above the :class:`LossBound` in force (:func:`bound_loss`; a round sets one from its
  objective's chance-level loss, ``server/training/policy.py``);
- **progress** ``(step, total, metrics)`` after every step; the loss is read from the device
  only when someone looks at it (progress, validation, the last step), since each read is a
  device sync.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> loss
ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total, metrics)
FetchFn = Callable[[np.ndarray], tuple[torch.Tensor, torch.Tensor]]  # indices -> (x, y) batch
StepHook = Callable[[int], None]  # called with the 0-based index of the current step

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def cross_entropy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``model(x)``; ``x`` is already a model input (the fetch scaled it)."""
    return F.cross_entropy(model(x), y)


class TrainingDivergedError(RuntimeError):
    """The training loss became NaN or infinite, or exceeded the :class:`LossBound` in force
    (lower the learning rate, or look for out-of-range training data)."""

    def __init__(self, message: str, *, step: int = 0, total: int = 0, loss: float = math.nan,
                 bound: float | None = None):
        super().__init__(message)
        self.step, self.total, self.loss, self.bound = step, total, loss, bound


@dataclass(frozen=True)
class LossBound:
    """A minibatch loss above ``max_loss`` means the run has exploded: its weights (or its
    data) are so far off that nothing it produces should ship. ``why`` says how the bound was
    chosen; the error quotes it."""

    max_loss: float
    why: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.max_loss) and self.max_loss > 0):
            raise ValueError(f"max_loss must be a positive finite number, got {self.max_loss}")


_LOSS_BOUND: ContextVar[LossBound | None] = ContextVar("edgeloop_loss_bound", default=None)


@contextmanager
def bound_loss(bound: LossBound | None) -> Iterator[None]:
    """Every :func:`run_loop` started inside the block (in this thread) fails with
    :class:`TrainingDivergedError` when a loss it reads exceeds ``bound`` (None: lift it).

    A context rather than a parameter, so that it reaches every loop of a round, whichever
    trainer runs it: plain Adam, DRESS's stages and norm fine-tuning, both DPU steps and its
    shadow chain, and loops a future model family brings, none of which a policy sees.
    """
    token = _LOSS_BOUND.set(bound)
    try:
        yield
    finally:
        _LOSS_BOUND.reset(token)


def active_loss_bound() -> LossBound | None:
    """The :class:`LossBound` in force in this thread (None: only non-finite losses fail)."""
    return _LOSS_BOUND.get()


class Optimizer(Protocol):
    """What the loop needs of an optimizer (torch's, or DPU's MaskedOptimizer)."""

    @property
    def param_groups(self) -> list[dict[str, Any]]: ...

    def zero_grad(self, set_to_none: bool = True) -> None: ...

    def step(self) -> Any: ...


# --- batching -----------------------------------------------------------------------------


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Minibatches in one pass over ``n`` samples under the tail rule of :func:`epoch_batches`."""
    if n < 0 or batch_size < 1:
        raise ValueError(f"need n >= 0 and batch_size >= 1, got n={n} batch_size={batch_size}")
    full, rest = divmod(n, batch_size)
    return full if rest == 1 and full > 0 else full + (1 if rest else 0)


def epoch_batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """One pass over ``range(n)`` in minibatches (shuffled when ``rng`` is given).

    Tail rule: a trailing batch of exactly one sample joins the previous batch (which then
    holds ``batch_size + 1``). BatchNorm cannot compute batch statistics from one value per
    channel ("Expected more than 1 value per channel"), and a one-sample step is the noisiest
    step of the epoch anyway. Any other remainder is its own, smaller batch. With
    ``batch_size=1`` every batch is one sample by request and nothing is merged.
    """
    order = rng.permutation(n) if rng is not None else np.arange(n)
    cuts = list(range(0, n, batch_size))
    if batch_size > 1 and len(cuts) > 1 and n - cuts[-1] == 1:
        cuts.pop()
    return [order[start:end] for start, end in zip(cuts, [*cuts[1:], n], strict=True)]


def batch_stream(
    n: int, batch_size: int, rng: np.random.Generator | None
) -> Iterator[tuple[int, bool, np.ndarray]]:
    """Endless epochs of :func:`epoch_batches`: ``(epoch, last batch of the epoch?, indices)``."""
    epoch = 0
    while True:
        batches = epoch_batches(n, batch_size, rng)
        for i, idx in enumerate(batches):
            yield epoch, i + 1 == len(batches), idx
        epoch += 1


@contextmanager
def _one_sample_norms(model: nn.Module, batch_len: int) -> Iterator[None]:
    """Run a one-sample batch with BatchNorm layers in eval mode.

    The tail rule leaves such a batch only when the whole training set is one sample (or
    ``batch_size=1``). A single sample has no batch variance, so instead of failing the step
    (and with it a round on an unlucky sample count) the step normalises with the running
    statistics, as the model will at inference; the weights and affine parameters still
    train, and the running statistics are left as they are.
    """
    norms = (
        [m for m in model.modules() if isinstance(m, _BATCH_NORMS) and m.training]
        if batch_len == 1
        else []
    )
    if not norms:
        yield
        return
    for m in norms:
        m.eval()
    try:
        yield
    finally:
        for m in norms:
            m.train()


# --- the loop -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Validation:
    """Validation inside the loop: ``metric(model)``, higher is better.

    Evaluated every ``every`` steps (default: once per epoch) and after the last step; the
    checkpoint with the best value is kept (ties prefer the later, longer-trained one). The
    metric may change the model's mode; the loop puts it back into training mode.
    """

    metric: Callable[[nn.Module], float]
    every: int | None = None
    name: str = "val_accuracy"  # key in the progress metrics

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError(f"validation every={self.every} must be >= 1")


@dataclass(frozen=True)
class Hooks:
    """Optional callbacks around each step (all get the 0-based step index or epoch)."""

    before_step: StepHook | None = None  # after backward, before optimizer.step: grads are set
    after_step: StepHook | None = None  # after optimizer.step: the parameters have moved
    end_of_epoch: Callable[[int], None] | None = None  # after the last batch of each epoch


@dataclass
class LoopResult:
    steps: int
    epochs: int  # complete passes over the data
    last_loss: float  # loss of the last step
    best_metric: float  # -inf without validation
    best_state: dict[str, torch.Tensor] | None  # on the model's device; None without validation
    _epoch_sum: torch.Tensor | float = math.nan
    _epoch_count: int = 0

    @property
    def epoch_loss(self) -> float:
        """Mean loss over the samples of the last epoch (the last one may be partial)."""
        if self._epoch_count == 0:
            return math.nan
        return float(self._epoch_sum) / self._epoch_count


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of ``model``'s state on its device (what the loop keeps as best)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _check_divergence(loss: float, bound: LossBound | None, steps: tuple[int, int], total: int,
                      context: str) -> None:
    """Raise :class:`TrainingDivergedError` if ``loss`` (the largest of ``steps``, first and
    last, 1-based) is not finite or is above ``bound``."""
    over = bound if bound is not None and loss > bound.max_loss else None
    if math.isfinite(loss) and over is None:
        return
    first, last = steps
    at = f"at step {last}/{total}" if first == last else f"in steps {first}-{last}/{total}"
    message = f"loss is {loss:.4g} {at}" + (f" of {context}" if context else "")
    if over is not None:
        message += f", above the divergence bound {over.max_loss:.4g}" + (f" ({over.why})" if over.why else "")
    raise TrainingDivergedError(message, step=last, total=total, loss=loss,
                                bound=over.max_loss if over is not None else None)


def run_loop(
    model: nn.Module,
    optimizer: Optimizer,
    loss_fn: LossFn,
    fetch: FetchFn,
    n: int,
    *,
    batch_size: int,
    num_steps: int,
    rng: np.random.Generator | None,
    lr_at: Callable[[int], float] | None = None,
    validation: Validation | None = None,
    hooks: Hooks = Hooks(),
    progress: ProgressFn | None = None,
    progress_offset: int = 0,
    progress_total: int | None = None,
    progress_extra: Mapping[str, float] | None = None,
    context: str = "",
) -> LoopResult:
    """Run ``num_steps`` optimizer steps of ``loss_fn`` on minibatches of ``n`` samples.

    Each step: set the rate ``lr_at(step)`` on every param group, ``zero_grad``, compute
    ``loss_fn(model, *fetch(indices))``, ``backward``, ``hooks.before_step``,
    ``optimizer.step``, ``hooks.after_step``; then validation when due, then
    ``progress(progress_offset + step + 1, progress_total, {**progress_extra, "loss", ...})``,
    then ``hooks.end_of_epoch`` when the epoch is done. ``context`` goes into the divergence
    message (e.g. which phase of which algorithm).

    Divergence: a non-finite loss, or one above :func:`active_loss_bound`, raises
    :class:`TrainingDivergedError` naming the step and the loss. A loss the loop reads (every
    step under a ``progress`` callback; else at validation and the last step) is checked
    before its step's update; under a bound, the steps in between are checked at the next
    read, by their largest loss (NaN propagates through the maximum).
    """
    if n < 1:
        raise ValueError("cannot train on an empty dataset")
    if num_steps < 0:
        raise ValueError(f"num_steps={num_steps} must be >= 0")
    per_epoch = steps_per_epoch(n, batch_size)
    eval_every = (validation.every or per_epoch) if validation is not None else 0
    total_report = progress_total if progress_total is not None else num_steps
    extra = dict(progress_extra or {})
    result = LoopResult(steps=num_steps, epochs=0, last_loss=math.nan, best_metric=-math.inf,
                        best_state=None)  # fmt: skip
    epoch_sum: torch.Tensor | float = 0.0
    epoch_count = 0
    stream = batch_stream(n, batch_size, rng)
    bound = active_loss_bound()
    # Under a bound, the largest loss of the steps nobody read, kept on the device (no sync)
    # and checked at the next read, so an explosion between reads is not missed.
    unread: tuple[int, torch.Tensor] | None = None  # (first such step, its largest loss)
    model.train()
    for step in range(num_steps):
        epoch, epoch_done, idx = next(stream)
        if lr_at is not None:
            lr = lr_at(step)
            for group in optimizer.param_groups:
                group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        xb, yb = fetch(idx)
        with _one_sample_norms(model, len(idx)):
            loss = loss_fn(model, xb, yb)
        last = step + 1 == num_steps
        evaluate = validation is not None and ((step + 1) % eval_every == 0 or last)
        if progress is not None or evaluate or last:
            # Reading the loss is a device sync, so it is done only when someone looks at it.
            if unread is not None:
                _check_divergence(float(unread[1]), bound, (unread[0], step), num_steps, context)
                unread = None
            result.last_loss = float(loss.detach())
            _check_divergence(result.last_loss, bound, (step + 1, step + 1), num_steps, context)
        elif bound is not None:
            worst = loss.detach() if unread is None else torch.maximum(unread[1], loss.detach())
            unread = (unread[0] if unread is not None else step + 1, worst)
        loss.backward()
        if hooks.before_step is not None:
            hooks.before_step(step)
        optimizer.step()
        if hooks.after_step is not None:
            hooks.after_step(step)
        epoch_sum = epoch_sum + loss.detach() * len(idx)  # stays on the device
        epoch_count += len(idx)
        metrics = {**extra, "loss": result.last_loss}
        if evaluate:
            assert validation is not None
            value = float(validation.metric(model))
            metrics[validation.name] = value
            if value >= result.best_metric:  # ties prefer the later, longer-trained checkpoint
                result.best_metric = value
                result.best_state = snapshot(model)
            model.train()
        if progress is not None:
            progress(progress_offset + step + 1, total_report, metrics)
        if epoch_done:
            result.epochs = epoch + 1
            result._epoch_sum, result._epoch_count = epoch_sum, epoch_count
            epoch_sum, epoch_count = 0.0, 0
            if hooks.end_of_epoch is not None:
                hooks.end_of_epoch(epoch)
                model.train()
    if epoch_count:  # a step-counted run that stopped inside an epoch
        result._epoch_sum, result._epoch_count = epoch_sum, epoch_count
    return result
