"""ALQ: adaptive loss-aware multi-bit quantization (thesis ch. 2, Alg. 2.5; docs/alq.md).

Weights are cut into groups (:mod:`shared.alq.groups`); each group is Σ_i α_i β_i with binary
bases β_i ∈ {±1}^n and coordinates α_i ≥ 0 (:mod:`shared.alq.multibit`). The pipeline
(:mod:`shared.alq.train`) initialises by structured sketching (Alg. 2.1), prunes coordinates in
the α domain by their modelled loss increment (Alg. 2.2) toward a target average bitwidth, and
optimises bases and coordinates with AMSGrad-style steps (Alg. 2.3, 2.4; :mod:`shared.alq.steps`).
:mod:`shared.alq.storage` bit-packs the result with an exact byte count, :mod:`shared.alq.runner`
executes it, and :mod:`shared.alq.vector` quantises a plain vector under a bit budget (the
``alq`` value format of ``shared.codec``).
"""

from shared.alq.groups import default_structure, from_groups, to_groups
from shared.alq.multibit import MultiBit, nearest_codes, sketch
from shared.alq.steps import StepConfig, TensorState, alpha_step, bases_step, prune_scores
from shared.alq.storage import PackedTensor, expand, model_bytes, pack, unpack
from shared.alq.train import ALQConfig, alq_quantize, init_states, quantisable

__all__ = [
    "ALQConfig",
    "MultiBit",
    "PackedTensor",
    "StepConfig",
    "TensorState",
    "alpha_step",
    "alq_quantize",
    "bases_step",
    "default_structure",
    "expand",
    "from_groups",
    "init_states",
    "model_bytes",
    "nearest_codes",
    "pack",
    "prune_scores",
    "quantisable",
    "sketch",
    "to_groups",
    "unpack",
]
