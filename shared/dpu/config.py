"""Configuration of one Deep Partial Updating round (thesis ch. 5)."""

from __future__ import annotations

from dataclasses import dataclass

# One tail rule for every trainer (a trailing one-sample batch joins the previous one), and
# one divergence error; both live with the shared loop and are re-exported here.
from shared.loop import TrainingDivergedError as TrainingDivergedError
from shared.loop import steps_per_epoch as steps_per_epoch

# dpu: Alg. 5.2 (combined contribution, Eq. 5.10); gcpu: Alg. 5.1 (global contribution only);
# rpu: random mask; magnitude: prune the weights themselves [RFC20]; full: no mask at all.
METHODS = ("dpu", "gcpu", "rpu", "magnitude", "full")
OPTIMIZERS = ("adam", "sgd")
# How an automatically triggered re-initialisation (§5.4.2) proceeds; see partial_update.
REINIT_MODES = ("shadow", "fallback")


class DPUConfigError(ValueError):
    """A DPU configuration or input is invalid; the message names the offending values."""


@dataclass(frozen=True)
class DPUConfig:
    """One round's hyper-parameters; both steps of Alg. 5.2 use the same schedule.

    The thesis trains the MNIST MLP with Adam, batch 128, 60 epochs, the learning rate decayed
    by 0.1 every 20 epochs (§5.5.1.1): ``epochs=60, lr_milestones=(1/3, 2/3), lr_gamma=0.1``.
    Its initial rate of 0.05 is far too large for torch's Adam on our MLP (it diverges), so the
    default here is 1e-3.
    """

    k: float = 0.01  # updating ratio: fraction of partially-updated weights shipped (Eq. 5.2)
    method: str = "dpu"  # one of METHODS
    epochs: int = 20  # passes over D^r per step; ignored when ``steps`` is set
    steps: int | None = None  # Q, optimizer steps per step of Alg. 5.2 (overrides epochs)
    batch_size: int = 128  # §5.5.1
    lr: float = 1e-3  # initial learning rate alpha^1
    optimizer: str = "adam"  # "adam" or "sgd"
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only (the thesis uses Nesterov SGD for ResNet56/MobileNet)
    weight_decay: float = 0.0
    lr_milestones: tuple[float, ...] = ()  # fractions of Q at which lr *= lr_gamma
    lr_gamma: float = 0.1
    seed: int = 0  # minibatch order and the RPU mask
    init_seed: int = 0  # seed of w^0; re-initialisation regenerates it (§5.5.2 (ii))
    eval_every: int | None = None  # steps between validation checks; default once per epoch
    skip_if_worse: bool = True  # ship nothing unless validation accuracy beats the deployed model
    reinit_mode: str = "shadow"  # one of REINIT_MODES

    def __post_init__(self) -> None:
        object.__setattr__(self, "lr_milestones", tuple(float(m) for m in self.lr_milestones))
        problems = []
        if not 0.0 <= self.k <= 1.0:
            problems.append(f"k={self.k} must lie in [0, 1]")
        if self.method not in METHODS:
            problems.append(f"method={self.method!r} must be one of {METHODS}")
        if self.reinit_mode not in REINIT_MODES:
            problems.append(f"reinit_mode={self.reinit_mode!r} must be one of {REINIT_MODES}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer={self.optimizer!r} must be one of {OPTIMIZERS}")
        if self.epochs < 1:
            problems.append(f"epochs={self.epochs} must be >= 1")
        if self.steps is not None and self.steps < 1:
            problems.append(f"steps={self.steps} must be >= 1 (or None to use epochs)")
        if self.batch_size < 1:
            problems.append(f"batch_size={self.batch_size} must be >= 1")
        if not self.lr > 0:
            problems.append(f"lr={self.lr} must be > 0")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            problems.append(
                f"weight_decay={self.weight_decay} must be >= 0 and momentum={self.momentum} "
                "must lie in [0, 1)"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            problems.append("nesterov=True needs optimizer='sgd' and momentum > 0")
        if any(not 0.0 < m < 1.0 for m in self.lr_milestones) or list(self.lr_milestones) != sorted(
            self.lr_milestones
        ):
            problems.append(f"lr_milestones={self.lr_milestones} must be increasing in (0, 1)")
        if not 0.0 < self.lr_gamma <= 1.0:
            problems.append(f"lr_gamma={self.lr_gamma} must lie in (0, 1]")
        if not 0 <= self.seed < 2**63 or not 0 <= self.init_seed < 2**63:
            problems.append(
                f"seed={self.seed} and init_seed={self.init_seed} must lie in [0, 2**63)"
            )
        if self.eval_every is not None and self.eval_every < 1:
            problems.append(f"eval_every={self.eval_every} must be >= 1")
        if problems:
            raise DPUConfigError("invalid DPUConfig: " + "; ".join(problems))

    def num_steps(self, n_samples: int) -> int:
        """Q: ``steps`` if set, else ``epochs`` passes of :func:`steps_per_epoch` minibatches
        (a one-sample tail joins the batch before it)."""
        if self.steps is not None:
            return self.steps
        return self.epochs * steps_per_epoch(n_samples, self.batch_size)
