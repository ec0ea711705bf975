"""The ``da3`` learner: a DA³ adaptor for this device's domain, beside the frozen fleet backbone.

The fleet model must be a ``resnet`` (the plain backbone, or a cohort adaptation of it that the
server shipped: the learner then starts from that adaptor). The backbone stays frozen, so the
delta is only the domain's tensors (``shared.da3.adaptor_tensor_names``: ``da3.*`` and the
classifier head) with ``arch`` the adapted spec; ``apply`` overlays them on the base, which
keeps the base's backbone tensors shared. Training runs ``shared.da3.train_domain`` with the
largest batch whose training memory (``shared.da3.plan_training``: analytic activations plus
gradients and Adam state of the trainable tensors) fits ``memory_budget_mb``; when not even a
batch of one fits, the learner refuses with the planner's reason. The meta reports memory
(analytic and measured saved-for-backward bytes), time, batch, training accuracy and the
gate's sparsity, which the agent's heartbeats carry as ``learner_*`` metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.personal.learner import (
    Learner,
    LearnerConfig,
    LearnerError,
    LearnerRefused,
    PersonalDelta,
    check_local_data,
    check_training_fields,
    register_learner,
)
from shared.tensors import StateDict

_MB = 1 << 20


@dataclass(frozen=True)
class DA3LearnerConfig(LearnerConfig):
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32  # the most; the memory budget may lower it
    memory_budget_mb: float | None = None  # None: no budget
    gate: bool = True
    seed: int = 0  # adaptor init, minibatch order and Gumbel noise

    def validate(self) -> None:
        check_training_fields(self.epochs, self.lr, self.batch_size, self.seed)
        if self.memory_budget_mb is not None and self.memory_budget_mb < 0:
            raise LearnerError(f"memory_budget_mb must be >= 0, got {self.memory_budget_mb}")


def adapted_spec(arch: ArchSpec, gate: bool = True) -> ArchSpec:
    """The DA³ spec to adapt ``arch`` to: its own if it is an adapted model already (a cohort
    adaptor from the server), else a fresh DA³ section over the resnet backbone."""
    from shared.da3 import da3_spec
    from shared.da3.artefact import FAMILY, backbone_spec

    if arch.kind != "resnet":
        raise LearnerRefused(f"da3 adapts a resnet fleet model (a frozen residual backbone), "
                             f"not a {arch.kind!r} model")
    others = sorted(k for k in arch.extra if k != FAMILY)
    if others:
        raise LearnerRefused(f"da3 cannot adapt a model of the families {others}")
    if FAMILY in arch.extra:
        return arch
    return da3_spec(backbone_spec(arch), gate=gate)


@register_learner
class DA3Learner(Learner):
    name = "da3"
    config_type = DA3LearnerConfig

    def adapt(self, arch: ArchSpec, base_state: StateDict, x: np.ndarray, y: np.ndarray,
              config: LearnerConfig) -> PersonalDelta:
        from shared.da3 import (
            DA3Error,
            DA3Refused,
            DA3TrainConfig,
            adaptor_tensor_names,
            evaluate_domain,
            plan_training,
            train_domain,
        )
        from shared.da3.artefact import FAMILY

        cfg = self.parse_config(config)
        assert isinstance(cfg, DA3LearnerConfig)
        spec = adapted_spec(arch, cfg.gate)
        x, y = check_local_data(arch, x, y)
        budget = None if cfg.memory_budget_mb is None else int(cfg.memory_budget_mb * _MB)
        try:
            batch = plan_training(spec, budget, batch=min(cfg.batch_size, len(x)))
        except DA3Refused as exc:
            raise LearnerRefused(f"no DA³ training fits the memory budget: {exc}") from exc
        model = build_model(spec)
        init_weights_from_seed(model, cfg.seed)  # the adaptor's init; the base fills the rest
        own = model.state_dict()
        warm = FAMILY in arch.extra  # a shipped adaptor: continue from it
        model.load_state_dict({k: v for k, v in base_state.items() if k in own
                               and own[k].shape == v.shape and (warm or not k.startswith(FAMILY + "."))},
                              strict=False)
        try:
            stats = train_domain(model, x, y, DA3TrainConfig(
                method="da3", epochs=cfg.epochs, lr=cfg.lr, batch=batch, seed=cfg.seed))
            ev = evaluate_domain(model, x, y)
        except DA3Error as exc:
            raise LearnerError(f"da3 training failed: {exc}") from exc
        state = model.state_dict()
        tensors: dict[str, torch.Tensor] = {n: state[n].detach().clone().contiguous() for n in adaptor_tensor_names(spec)}
        meta: dict[str, float | int] = {"batch": batch, "memory_budget_bytes": budget if budget is not None else -1,
                "train_accuracy": float(ev["accuracy"]), "gate_sparsity": float(ev["gate_sparsity"]),
                "flops": float(ev["flops"]), "flops_dense": float(ev["flops_dense"]),
                **{k: float(stats[k]) for k in ("train_loss", "seconds", "saved_bytes",
                                                 "analytic_bytes", "trainable_params") if k in stats}}
        return PersonalDelta(tensors, meta=meta, arch=spec)
