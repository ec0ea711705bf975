"""Objectives: what a model family optimises and how a version of it is scored.

An update policy (server/training: full retraining, DPU and its baselines) decides *what
ships*; the objective of the model's family decides *what is optimised and measured*. The two
are orthogonal: every policy runs with every objective through this interface, without
asking which family it has. :func:`objective_for` picks the objective from the ``ArchSpec``:
the one the spec's model family offers (``ModelFamily.objective``), else
:class:`CrossEntropyObjective` for a plain model.

Data are duck-typed (:class:`LabelledArrays`: ``x_train, y_train, x_val, y_val`` arrays as
stored, e.g. uint8 images), so ``shared`` needs nothing from the server. Everything runs on
the model's device; ``fit`` trains on CPU unless the family's trainer says otherwise.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from shared.dpu import cross_entropy_loss, top1_accuracy
from shared.models.families import FamilyError, families_of
from shared.models.spec import ArchSpec
from shared.training import TrainConfig, accuracy, train_supervised

StateDict = Mapping[str, torch.Tensor]
LossFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]  # (model, x, y) -> loss
MetricFn = Callable[[nn.Module, torch.Tensor, torch.Tensor], float]  # higher is better
ProgressFn = Callable[[int, int, dict[str, float]], None]  # (step, total, metrics)


class LabelledArrays(Protocol):
    """Training and validation split, inputs as stored and integer labels."""

    @property
    def x_train(self) -> np.ndarray: ...
    @property
    def y_train(self) -> np.ndarray: ...
    @property
    def x_val(self) -> np.ndarray: ...
    @property
    def y_val(self) -> np.ndarray: ...


@dataclass(frozen=True)
class FitSettings:
    """How long and how hard :meth:`Objective.fit` trains. An objective with its own
    optimiser schedule (DRESS: Nesterov SGD with cosine decay, §3.4.1) uses ``epochs``,
    ``batch_size`` and ``seed`` and ignores the rest."""

    epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.0
    seed: int = 0  # minibatch order

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or not self.lr > 0 or self.weight_decay < 0 or self.seed < 0:
            raise ValueError(f"invalid fit settings {self}")


@dataclass(frozen=True)
class Evaluation:
    """How good a version is: ``val_accuracy`` in [0, 1] is what policies compare (skip if
    worse); ``details`` are further JSON-able round metrics (DRESS: ``subnet_val_accuracy``)."""

    val_accuracy: float
    details: dict[str, Any] = field(default_factory=dict)


class Objective(ABC):
    """What a model family optimises and how a version is evaluated.

    ``base_state`` is the deployed model a round starts from; an objective may read what the
    family stores in it (DRESS: the allocation). Every method leaves the data untouched.
    """

    name: ClassVar[str]  # shows in round metrics (e.g. DPU's ``variant="dress-full"``)

    @abstractmethod
    def loss_fn(self, model: nn.Module, base_state: StateDict) -> LossFn:
        """What partial training of ``base_state`` minimises, per minibatch."""

    @abstractmethod
    def metric_fn(self, model: nn.Module, base_state: StateDict, data: LabelledArrays) -> MetricFn:
        """Validation metric for checkpoint selection and skip-if-worse during training."""

    def needs_full_fit(self, state: StateDict) -> bool:
        """Whether ``state`` cannot be partially updated and must be fitted in full first."""
        return False

    @abstractmethod
    def fit(self, model: nn.Module, data: LabelledArrays, settings: FitSettings,
            progress: ProgressFn | None = None) -> dict[str, Any]:
        """Train ``model`` in full, from its current weights, in place; returns training
        metrics (the caller scores the result with :meth:`evaluate`)."""

    def finish(self, model: nn.Module, base_state: StateDict, data: LabelledArrays,
               settings: FitSettings) -> None:
        """Complete a partial update in place: ``model`` holds the new weights, trained from
        ``base_state`` with :meth:`loss_fn`. Default: nothing to do."""
        return None

    @abstractmethod
    def evaluate(self, model: nn.Module, data: LabelledArrays) -> Evaluation:
        """Score ``model`` as a device would run it, on the validation split (non-empty)."""

    def chance_loss(self, arch: ArchSpec) -> float:
        """The loss of a uniform prediction over ``arch``'s classes, the scale an untrained
        model starts at; a round's divergence bound is a multiple of it. ln(C) for
        cross-entropy, and for DRESS's subnet loss too, whose weights sum to one (Eq. 3.6-3.7).
        An objective whose loss lives on another scale overrides this."""
        return math.log(arch.num_classes)


class CrossEntropyObjective(Objective):
    """A plain classifier: cross-entropy, top-1 accuracy, Adam for a full fit."""

    name = "plain"

    def loss_fn(self, model: nn.Module, base_state: StateDict) -> LossFn:
        return cross_entropy_loss

    def metric_fn(self, model: nn.Module, base_state: StateDict, data: LabelledArrays) -> MetricFn:
        return top1_accuracy

    def fit(self, model: nn.Module, data: LabelledArrays, settings: FitSettings,
            progress: ProgressFn | None = None) -> dict[str, Any]:
        has_val = len(data.y_val) > 0
        stats = train_supervised(
            model, data.x_train, data.y_train,
            TrainConfig(epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr,
                        weight_decay=settings.weight_decay, seed=settings.seed),
            x_val=data.x_val if has_val else None, y_val=data.y_val if has_val else None,
            progress=progress,
        )  # fmt: skip
        return {"train_loss": stats["train_loss"]}

    def evaluate(self, model: nn.Module, data: LabelledArrays) -> Evaluation:
        return Evaluation(accuracy(model, data.x_val, data.y_val))


def objective_for(arch: ArchSpec) -> Objective:
    """The objective of ``arch``'s model family (cross-entropy for a plain model)."""
    offered = [(family.name, objective) for family, spec in families_of(arch)
               if (objective := family.objective(arch, spec)) is not None]
    if len(offered) > 1:
        raise FamilyError(f"model families {[n for n, _ in offered]} each define an objective; "
                          "an architecture may combine at most one such family")
    return offered[0][1] if offered else CrossEntropyObjective()
