"""DA³: Dynamic Additive Attention Adaption (memory-efficient on-device multi-domain learning)
over a frozen ``resnet`` backbone, with its baselines. See docs/da3.md."""

from shared.da3.family import FAMILY, DA3Family
from shared.da3.memory import (
    METHODS,
    BlockBytes,
    SavedTensorsCounter,
    analytic_training_memory,
    da3_block_bytes,
    head_loss_bytes,
)
from shared.da3.net import DA3Net, block_shapes
from shared.da3.spec import ADAPTORS, NAME, DA3Error, DA3Refused, DA3Spec, da3_spec, section_of
from shared.da3.train import (
    DA3TrainConfig,
    adaptor_tensor_names,
    evaluate_domain,
    model_flops,
    plan_training,
    resize_images,
    train_domain,
    trainable_names,
    trainable_parameter_count,
)

__all__ = [
    "ADAPTORS", "FAMILY", "METHODS", "NAME", "BlockBytes", "DA3Error", "DA3Family", "DA3Net",
    "DA3Refused", "DA3Spec", "DA3TrainConfig", "SavedTensorsCounter", "adaptor_tensor_names",
    "analytic_training_memory", "block_shapes", "da3_block_bytes", "da3_spec", "evaluate_domain",
    "head_loss_bytes", "model_flops", "plan_training", "resize_images", "section_of",
    "train_domain", "trainable_names", "trainable_parameter_count",
]  # fmt: skip
