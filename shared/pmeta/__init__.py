"""p-Meta (thesis ch. 4): meta-training for memory-efficient on-device few-shot learning.

See docs/pmeta.md for the method mapped equation by equation to this package.
"""

from shared.data.tasks import Task, TaskSampler, to_model_input
from shared.pmeta.attention import attention_score, clip_and_renormalise
from shared.pmeta.device import (
    AdaptConfig,
    AdaptResult,
    SavedBytesCounter,
    adapt,
    adapted_logits,
    adapted_model,
    plan_adaptation,
)
from shared.pmeta.errors import PMetaError, PMetaRefused
from shared.pmeta.family import FAMILY, PMetaFamily
from shared.pmeta.memory import adaptation_flops, adaptation_memory, inference_flops
from shared.pmeta.meta import METHODS, MetaTrainConfig, evaluate_tasks, lasso_penalty, meta_train
from shared.pmeta.spec import Layer, PMetaSpec, backbone_layers, pmeta_spec

__all__ = [
    "FAMILY", "METHODS", "AdaptConfig", "AdaptResult", "Layer", "MetaTrainConfig", "PMetaError", "PMetaFamily",
    "PMetaRefused", "PMetaSpec", "SavedBytesCounter", "Task", "TaskSampler", "adapt", "adaptation_flops",
    "adaptation_memory", "adapted_logits", "adapted_model", "attention_score", "backbone_layers",
    "clip_and_renormalise", "evaluate_tasks", "inference_flops", "lasso_penalty", "meta_train",
    "plan_adaptation", "pmeta_spec", "to_model_input",
]  # fmt: skip
