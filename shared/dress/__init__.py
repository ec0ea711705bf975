"""DRESS: nested sparse subnets of one backbone (thesis ch. 3).

Training (Alg. 3.1): :func:`train_dress`, or :func:`dress_loss` / :class:`DressLoss` inside any
``loss_fn(model, x, y)`` loop. Sampling (Alg. 3.2, §3.3.2): :func:`row_masks`,
:func:`allocate_sparsity`. Storage (§3.3.4): :func:`build_dress_tables` -> :class:`DressTables`
(DRESS-CSR). Inference: :class:`DressRunner`. Costs: :mod:`shared.dress.profiling`.
In a fleet: the ``dress`` model family (:mod:`shared.dress.family`, found through its entry
point) and its objective (:mod:`shared.dress.objective`); docs/architecture.md.
"""

from shared.dress.baseline import csr_storage_bytes, global_magnitude_masks, prune_with_rewinding
from shared.dress.layers import DressError, SparseLayer, sparse_layers
from shared.dress.loss import DressLoss, dress_loss, subnet_losses
from shared.dress.masks import DressMask, SubnetMasks, load_norm_state, norm_state
from shared.dress.profiling import (
    Latency,
    measure_latency,
    measure_switch,
    peak_memory_estimate,
    subnet_flops,
    subnet_storage,
)
from shared.dress.runner import DressNet, DressRunner
from shared.dress.sampling import (
    ALLOCATION_MODES,
    DEFAULT_GAMMA,
    DEFAULT_SPARSITIES,
    Allocation,
    allocate_sparsity,
    check_allocation,
    check_masks,
    default_sparsities,
    loss_weights,
    row_masks,
    row_order,
    row_ranks,
)
from shared.dress.serialize import (
    storage_bytes,
    tables_from_bytes,
    tables_from_safetensors,
    tables_to_bytes,
    tables_to_safetensors,
)
from shared.dress.tables import (
    FORMAT,
    DressTables,
    build_dress_tables,
    subnet_state_dict,
    subnet_tables,
    validate_tables,
)
from shared.dress.train import (
    DressConfig,
    DressResult,
    evaluate_subnets,
    finetune_norms,
    train_dress,
)

__all__ = [
    "ALLOCATION_MODES", "DEFAULT_GAMMA", "DEFAULT_SPARSITIES", "FORMAT", "Allocation",
    "DressConfig", "DressError", "DressLoss", "DressMask", "DressNet", "DressResult",
    "DressRunner", "DressTables", "Latency", "SparseLayer", "SubnetMasks", "allocate_sparsity",
    "build_dress_tables", "check_allocation", "check_masks", "csr_storage_bytes",
    "default_sparsities", "dress_loss", "evaluate_subnets", "finetune_norms",
    "global_magnitude_masks", "load_norm_state", "loss_weights", "measure_latency",
    "measure_switch", "norm_state", "peak_memory_estimate", "prune_with_rewinding", "row_masks",
    "row_order", "row_ranks", "sparse_layers", "storage_bytes", "subnet_flops", "subnet_losses",
    "subnet_state_dict", "subnet_storage", "subnet_tables", "tables_from_bytes",
    "tables_from_safetensors", "tables_to_bytes", "tables_to_safetensors", "train_dress",
    "validate_tables",
]  # fmt: skip
