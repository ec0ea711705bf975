"""Deep Partial Updating (thesis ch. 5): retrain on the server, ship only k*I critical weights.

``partial_update`` runs one round (Alg. 5.2 and the baselines of §5.5.5); the pieces it is made
of (contributions, global top-k, masked optimizer, re-initialisation rule, byte budget) are
public so the server and benchmarks can use them on their own. Nothing here depends on the
diff codec: encode ``diff(result.diff_base -> result.state)`` with it.
"""

from shared.dpu.budget import (
    binary_entropy,
    dense_bytes,
    k_for_byte_budget,
    num_partial_weights,
    paper_update_bits,
)
from shared.dpu.config import (
    METHODS,
    REINIT_MODES,
    DPUConfig,
    DPUConfigError,
    TrainingDivergedError,
)
from shared.dpu.feedback import add_residual
from shared.dpu.loop import cross_entropy_loss, lr_at, top1_accuracy, train_phase
from shared.dpu.masked import MaskedOptimizer
from shared.dpu.reinit import seeded_state, should_reinitialize
from shared.dpu.selection import (
    accumulate_local_contribution,
    combined_contribution,
    global_contribution,
    global_topk_mask,
    magnitude_scores,
    num_selected,
    partial_parameter_names,
    random_scores,
)
from shared.dpu.update import PartialUpdateResult, ShadowChain, partial_update

__all__ = [
    "METHODS",
    "REINIT_MODES",
    "DPUConfig",
    "DPUConfigError",
    "MaskedOptimizer",
    "PartialUpdateResult",
    "ShadowChain",
    "TrainingDivergedError",
    "accumulate_local_contribution",
    "add_residual",
    "binary_entropy",
    "combined_contribution",
    "cross_entropy_loss",
    "dense_bytes",
    "global_contribution",
    "global_topk_mask",
    "k_for_byte_budget",
    "lr_at",
    "magnitude_scores",
    "num_partial_weights",
    "num_selected",
    "paper_update_bits",
    "partial_parameter_names",
    "partial_update",
    "random_scores",
    "seeded_state",
    "should_reinitialize",
    "top1_accuracy",
    "train_phase",
]
