"""Which tensors DRESS sparsifies, and how each one is cut into rows (thesis §3.3.4).

A *sparse layer* is every ``nn.Conv2d`` and ``nn.Linear`` of a model. Its weight is viewed as
``G`` rows of ``N`` weights: a row is one conv filter (``N = C_in/groups * kh * kw``) or one fc
output neuron (``N = in_features``), the "filterwise" row size the thesis adopts (§3.4.2.1).
Biases and normalisation layers stay dense and are shared by all subnets (§3.4.1). The overall
sparsity ``s_k`` of a subnet is measured over exactly these weight tensors (Eq. 3.2's ``I``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize


class DressError(ValueError):
    """Invalid DRESS input: sparsities, allocations, masks, tables or model layouts."""


@dataclass(frozen=True)
class SparseLayer:
    """One sparsified weight: module ``name`` (its weight is ``f"{name}.weight"``)."""

    name: str
    kind: str  # "conv" or "fc"
    shape: tuple[int, ...]

    @property
    def rows(self) -> int:  # G: filters or output neurons
        return int(self.shape[0])

    @property
    def row_size(self) -> int:  # N: weights per row
        return int(math.prod(self.shape[1:]))

    @property
    def numel(self) -> int:
        return self.rows * self.row_size


def sparse_layers(model: nn.Module) -> list[SparseLayer]:
    """The conv/fc layers of ``model`` in ``named_modules`` (= state_dict) order."""
    layers = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            kind = "conv"
        elif isinstance(module, nn.Linear):
            kind = "fc"
        else:
            continue
        layers.append(SparseLayer(name, kind, tuple(int(d) for d in dense_weight(module).shape)))
    if not layers:
        raise DressError(f"{type(model).__name__} has no Conv2d or Linear layer to sparsify")
    return layers


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The dense backbone weight ``w`` of a conv/fc module, also while masks are applied."""
    weight: torch.Tensor | nn.Module | None = None
    if parametrize.is_parametrized(module, "weight"):
        parametrizations = module.parametrizations  # nn.ModuleDict of ParametrizationLists
        if isinstance(parametrizations, nn.ModuleDict):
            weight = parametrizations["weight"].original
    else:
        weight = module.weight  # (when parametrized this would compute the masked weight)
    if not isinstance(weight, torch.Tensor):  # nn.Module attributes are typed Tensor | Module
        raise DressError(f"{type(module).__name__}.weight is not a tensor")
    return weight


def as_rows(weight: torch.Tensor) -> torch.Tensor:
    """``(G, *)`` weight viewed as ``(G, N)`` rows (Alg. 3.2's reshape)."""
    return weight.reshape(weight.shape[0], -1)
