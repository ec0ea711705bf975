"""The ``pmeta`` learner: few-shot learning of the device's own classes with p-Meta (thesis ch. 4).

The fleet model is a meta-trained p-Meta model (``ArchSpec.extra["pmeta"]``: backbone, per
layer and step inner step sizes α, meta attention). Given a support set of ``k`` classes
(labels ``0..k-1``, ``2 <= k <= ways`` of the fleet model), :func:`shared.pmeta.plan_adaptation`
picks the adaptation config that fits the device's memory budget (sample batch size, forward
attention clip) or refuses, and :func:`shared.pmeta.adapt` runs Eq. 4.3 with α and γ without
touching the base. The delta is the adapted tensors; when ``k < ways`` the classifier (and
every other tensor whose shape depends on the class count) is cut to its first ``k`` outputs
and the served arch names ``num_classes = k``: the personal model answers in the support set's
label space only (label ``i`` is the ``i``-th class name, kept in the delta's meta).

Like every learner this is plain compute: the memory budget arrives in the config.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from shared.models import ArchSpec, build_model
from shared.personal.learner import (
    Learner,
    LearnerConfig,
    LearnerError,
    LearnerRefused,
    PersonalDelta,
    check_local_data,
    register_learner,
)
from shared.tensors import StateDict

FAMILY = "pmeta"


@dataclass(frozen=True)
class PMetaLearnerConfig(LearnerConfig):
    memory_budget_mb: float | None = None  # the governor's memory budget (None: no limit)
    classes: str = ""  # JSON list of the support set's class names in label order ("": unnamed)
    support_hash: str = ""  # the support set's fingerprint: a changed support set re-adapts
    steps: int = 0  # inner steps (0: the model's inner_steps)

    def validate(self) -> None:
        if self.memory_budget_mb is not None and self.memory_budget_mb < 0:
            raise LearnerError(f"memory_budget_mb must be >= 0, got {self.memory_budget_mb}")
        if not 0 <= self.steps <= 100:
            raise LearnerError(f"steps must lie in [0, 100], got {self.steps}")
        self.class_names()

    def class_names(self) -> list[str]:
        if not self.classes:
            return []
        try:
            names = json.loads(self.classes)
        except json.JSONDecodeError as exc:
            raise LearnerError(f"classes must be a JSON list of strings: {exc}") from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise LearnerError("classes must be a JSON list of strings")
        if len(set(names)) != len(names):
            raise LearnerError("classes must be distinct")
        return names


def served_arch_for(arch: ArchSpec, k: int) -> ArchSpec:
    """The base spec with ``k`` classes (the family section unchanged)."""
    return dataclasses.replace(arch, num_classes=k)


def _shapes(arch: ArchSpec) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {n: tuple(t.shape) for n, t in build_model(arch).state_dict().items()}


def cut_to_classes(arch: ArchSpec, state: StateDict, k: int) -> dict[str, torch.Tensor]:
    """The tensors of ``state`` whose shape depends on the class count, cut to the first ``k``
    classes (their first ``k`` entries along each dimension that shrank)."""
    want = _shapes(served_arch_for(arch, k))
    out = {}
    for name, shape in want.items():
        t = state[name]
        if tuple(t.shape) == shape:
            continue
        if len(shape) != t.dim() or any(s > d for s, d in zip(shape, t.shape, strict=True)):
            raise LearnerError(f"tensor {name} {tuple(t.shape)} cannot be cut to {shape}")
        out[name] = t[tuple(slice(0, s) for s in shape)].clone().contiguous()
    return out


@register_learner
class PMetaLearner(Learner):
    name = "pmeta"
    config_type = PMetaLearnerConfig

    def adapt(self, arch: ArchSpec, base_state: StateDict, x: np.ndarray, y: np.ndarray,
              config: LearnerConfig) -> PersonalDelta:
        cfg = self.parse_config(config)
        assert isinstance(cfg, PMetaLearnerConfig)
        if arch.extra.get(FAMILY) is None:
            raise LearnerRefused("the pmeta learner needs a p-Meta fleet model (model family 'pmeta'); "
                                 f"this one has families {sorted(k for k, v in arch.extra.items() if v is not None)}")
        from shared import pmeta  # imported when used: the algorithm package is large

        names = cfg.class_names()
        k = len(names) if names else int(np.max(y)) + 1 if len(y) else 0
        x, y = check_local_data(arch, x, y, classes=k, what="support inputs")
        if k < 2:
            raise LearnerRefused(f"few-shot learning needs at least 2 classes, the support set has {k}")
        if k > arch.num_classes:
            raise LearnerRefused(f"the support set has {k} classes; the fleet model adapts to at most "
                                 f"{arch.num_classes} ({arch.num_classes}-way tasks)")
        model = build_model(arch)
        model.load_state_dict(base_state)
        budget = None if cfg.memory_budget_mb is None else int(cfg.memory_budget_mb * (1 << 20))
        try:
            plan = pmeta.plan_adaptation(model, len(y), budget)
        except pmeta.PMetaRefused as exc:
            raise LearnerRefused(exc.reason) from exc
        if cfg.steps:
            plan = dataclasses.replace(plan, steps=cfg.steps)
        sx = pmeta.to_model_input(x)
        sy = torch.as_tensor(y, dtype=torch.long)
        start = time.perf_counter()
        try:
            result = pmeta.adapt(model, sx, sy, plan)
        except pmeta.PMetaRefused as exc:
            raise LearnerRefused(str(exc)) from exc
        except pmeta.PMetaError as exc:
            raise LearnerError(str(exc)) from exc
        seconds = time.perf_counter() - start
        tensors = {n: t.detach().clone().contiguous() for n, t in result.state.items()}
        served = {**base_state, **tensors}
        tensors.update(cut_to_classes(arch, served, k))
        served_arch = served_arch_for(arch, k) if k < arch.num_classes else None
        meta: dict[str, Any] = {
            "classes": names or [str(i) for i in range(k)], "ways": arch.num_classes,
            "shots_min": int(np.bincount(y, minlength=k).min()), "support_samples": len(y),
            "saved_bytes": int(result.saved_bytes), "analytic_bytes": int(result.analytic_bytes),
            "adapt_seconds": float(result.seconds), "seconds": float(seconds),
            "steps": int(result.steps), "sample_batch": int(plan.sample_batch),
            "rho_fw": None if plan.rho_fw is None else float(plan.rho_fw),
            "memory_budget_mb": cfg.memory_budget_mb,
        }
        meta["support_accuracy"] = _accuracy(served_arch or arch, {**served, **tensors}, sx, sy)
        return PersonalDelta(tensors, meta=meta, arch=served_arch)


@torch.no_grad()
def _accuracy(arch: ArchSpec, state: StateDict, x: torch.Tensor, y: torch.Tensor) -> float:
    model = build_model(arch)
    model.load_state_dict(state)
    model.eval()
    return float((model(x).argmax(1) == y).float().mean())
