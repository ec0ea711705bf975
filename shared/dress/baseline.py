"""The comparison point of thesis Table 3.1: K separately pruned models ([RFC20]).

Each sparsity ``s`` gets its own copy of the dense pre-trained model, pruned iteratively by
global unstructured magnitude (over the same conv/fc weights DRESS sparsifies) along the
schedule ``s * p^r`` with ``p = 0.5, 0.8, 0.9, 0.95, 1`` (§3.4.2.3), each round fine-tuning the
surviving weights with learning-rate rewinding (the cosine schedule restarts from the initial
rate). Storage is priced as standard CSR (row pointers, column indices, values) plus dense
biases and norms, serialised like the DRESS tables so both counts include every byte.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence

import numpy as np
import torch
from safetensors.torch import save as st_save
from torch import nn
from torch.nn.utils import parametrize

from shared.dress.layers import DressError, as_rows, sparse_layers
from shared.dress.loops import OptimSettings, TensorData, accuracy_on, cross_entropy, sgd_epochs
from shared.dress.masks import NORM_STATE, norm_layers
from shared.dress.sampling import check_sparsities
from shared.dress.tables import index_dtype, template_model
from shared.models.spec import ArchSpec
from shared.tensors import StateDict, clone_state

RFC20_SCHEDULE = (0.5, 0.8, 0.9, 0.95, 1.0)  # fraction of the target sparsity per round


class _FixedMask(nn.Module):
    mask: torch.Tensor

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


@torch.no_grad()
def global_magnitude_masks(
    weights: dict[str, torch.Tensor], sparsity: float
) -> dict[str, torch.Tensor]:
    """Unstructured masks keeping the ``round((1 - s) I)`` largest ``|w|`` over all layers."""
    check_sparsities([sparsity])
    flat = torch.cat([w.detach().reshape(-1).abs().float() for w in weights.values()])
    keep = int(math.floor((1.0 - sparsity) * flat.numel() + 0.5))
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:keep]] = True
    out, start = {}, 0
    for name, w in weights.items():
        out[name] = mask[start : start + w.numel()].view(w.shape)
        start += w.numel()
    return out


def prune_with_rewinding(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    sparsity: float,
    config: OptimSettings,
    *,
    epochs_per_round: int = 1,
    schedule: Sequence[float] = RFC20_SCHEDULE,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], float]:
    """Prune ``model`` (trained, modified in place) to ``sparsity``; returns (state, val acc).

    The returned state holds the pruned weights as zeros (the masks are folded in).
    """
    if epochs_per_round < 1 or not schedule or abs(schedule[-1] - 1.0) > 1e-12:
        raise DressError(
            f"need epochs_per_round >= 1 and a schedule ending at 1, got {list(schedule)}"
        )
    model.to(device)
    train, val = TensorData(x, y, device), TensorData(x_val, y_val, device)
    modules = dict(model.named_modules())
    layers = [layer.name for layer in sparse_layers(model)]
    masks: dict[str, _FixedMask] = {}
    for r, frac in enumerate(schedule):
        weights = {
            n: (
                masks[n](modules[n].parametrizations.weight.original)
                if n in masks
                else modules[n].weight
            )
            for n in layers
        }
        new = global_magnitude_masks(weights, sparsity * frac)
        for n in layers:
            if n in masks:
                masks[n].mask.copy_(new[n])
            else:
                masks[n] = _FixedMask(new[n])
                parametrize.register_parametrization(modules[n], "weight", masks[n])
        sgd_epochs(model, cross_entropy, train, epochs_per_round, config, seed_offset=100 + r)
    acc = accuracy_on(model, val)
    for n in layers:
        parametrize.remove_parametrizations(modules[n], "weight", leave_parametrized=True)
    return clone_state(model.state_dict()), acc


def csr_storage_bytes(state: StateDict, spec: ArchSpec) -> int:
    """Bytes of ``state`` stored as standard CSR per conv/fc layer (int32 row pointers, smallest
    column-index dtype, values) plus dense biases and norms, as one safetensors file."""
    template = template_model(spec)
    tensors: dict[str, torch.Tensor] = {}
    for layer in sparse_layers(template):
        key = f"{layer.name}.weight"
        if key not in state:
            raise DressError(f"state lacks {key!r}")
        rows = as_rows(state[key].detach().to("cpu"))
        nz = rows != 0
        crow = torch.zeros(layer.rows + 1, dtype=torch.int32)
        crow[1:] = nz.sum(dim=1).cumsum(0).to(torch.int32)
        tensors[f"{layer.name}.crow"] = crow
        tensors[f"{layer.name}.col"] = nz.nonzero()[:, 1].to(index_dtype(layer.row_size))
        tensors[f"{layer.name}.value"] = rows[nz].contiguous()
        if f"{layer.name}.bias" in state:
            tensors[f"{layer.name}.bias"] = (
                state[f"{layer.name}.bias"].detach().to("cpu").contiguous()
            )
    for name in norm_layers(template):
        for key in NORM_STATE:
            tensors[f"{name}.{key}"] = state[f"{name}.{key}"].detach().to("cpu").contiguous()
    meta = {"format": "csr/v1", "arch": spec.to_json()}
    return len(st_save(tensors, metadata={"csr.meta": json.dumps(meta, sort_keys=True)}))


def dense_storage_bytes(state: StateDict) -> int:
    """Bytes of the dense float model as one safetensors file (reference point)."""
    tensors = {
        k: v.detach().to("cpu").contiguous() for k, v in state.items() if v.is_floating_point()
    }
    return len(st_save(tensors))
