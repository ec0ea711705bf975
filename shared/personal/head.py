"""The test learner: fine-tune only the final classifier ``Linear`` on the device's data.

Everything before the classifier stays frozen, BatchNorm statistics included, so the
classifier's inputs are computed once with the base model in eval mode and the head is trained
on those features alone (a few epochs of Adam via :func:`shared.training.train_supervised`).
The delta is the head's weight and bias: a few kB, whatever the backbone's size. This is the
"last layer only" baseline of the thesis's adaptation chapters, here to make the seam real.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared.models import ArchSpec, build_model
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
from shared.tensors import StateDict, to_model_input
from shared.training import TrainConfig, train_supervised


@dataclass(frozen=True)
class HeadFinetuneConfig(LearnerConfig):
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.0
    seed: int = 0  # minibatch order: the same data and base give the same head

    def validate(self) -> None:
        check_training_fields(self.epochs, self.lr, self.batch_size, self.seed)
        if self.weight_decay < 0:
            raise LearnerError("weight_decay must be >= 0")


def classifier_head(model: nn.Module, num_classes: int) -> tuple[str, nn.Linear]:
    """The last ``nn.Linear`` producing ``num_classes`` outputs, with its module path."""
    found = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not found:
        raise LearnerRefused(f"the model has no Linear classifier with {num_classes} outputs")
    return found[-1]


@torch.no_grad()
def head_inputs(model: nn.Module, head: nn.Linear, x: np.ndarray, batch_size: int = 256
                ) -> torch.Tensor:
    """What ``head`` receives for each input, from the frozen model in eval mode."""
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0].detach()))
    try:
        model.eval()
        for i in range(0, len(x), batch_size):
            model(to_model_input(x[i : i + batch_size]))
    finally:
        hook.remove()
    return torch.cat(captured)


@register_learner
class HeadFinetuneLearner(Learner):
    name = "head"
    config_type = HeadFinetuneConfig

    def adapt(self, arch: ArchSpec, base_state: StateDict, x: np.ndarray, y: np.ndarray,
              config: LearnerConfig) -> PersonalDelta:
        cfg = self.parse_config(config)
        assert isinstance(cfg, HeadFinetuneConfig)
        if any(v is not None for v in arch.extra.values()):
            # A DRESS head is pruned per subnet from the shared allocation; a densely tuned
            # head would not be what the subnets run. Families adapt their own way (p-Meta, DA³).
            raise LearnerRefused(f"head fine-tuning supports plain models only, not {sorted(arch.extra)}")
        x, y = check_local_data(arch, x, y)
        model = build_model(arch)
        model.load_state_dict(base_state)
        path, head = classifier_head(model, arch.num_classes)
        feats = head_inputs(model, head, x)
        trained = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
        trained.load_state_dict(head.state_dict())
        stats = train_supervised(trained, feats.numpy(), y,
                                 TrainConfig(epochs=cfg.epochs, batch_size=cfg.batch_size,
                                             lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed))
        tensors = {f"{path}.{k}": v.detach().clone().contiguous()
                   for k, v in trained.state_dict().items()}
        return PersonalDelta(tensors, meta={"head": path,
                                            "train_loss": float(stats["train_loss"])})
