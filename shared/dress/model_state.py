"""A DRESS model as one ordinary state dict, so artefacts, hashes, diffs and stores need no
special case.

An :class:`~shared.models.ArchSpec` whose ``extra["dress"]`` is ``{"sparsities": [...],
"gamma": g}`` builds (``shared.models.build_model``) the plain backbone plus an inert
``dress`` sub-module holding what DRESS adds to the dense weights:

* ``dress.counts``: int64 ``(K, L)``, the layer-wise allocation (nonzeros per row of each
  sparse layer for every subnet), so server and device build the same masks;
* ``dress.norm.<k>.<bn name>.<weight|bias|running_mean|running_var>``: subnet k's normalisation
  parameters from §3.3.5 (absent for models without norm layers).

The forward pass ignores the sub-module (it is the dense model); a DRESS runner is built from
the whole state with :func:`tables_from_state`. A DPU diff changes these buffers like any other
dense tensor, and :func:`tables_from_state` is deterministic, so a device that applied the diff
rebuilds tables bit-identical to the server's.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shared.dress.layers import DressError, sparse_layers
from shared.dress.masks import NORM_STATE, norm_layers
from shared.dress.sampling import Allocation, check_sparsities, loss_weights
from shared.dress.tables import DressTables, build_dress_tables
from shared.models import ArchSpec, build_model

NAME = "dress"  # the ArchSpec.extra key and the sub-module holding the buffers
PREFIX = NAME + "."
DEFAULT_GAMMA = 0.5


@dataclass(frozen=True)
class DressSpec:
    sparsities: tuple[float, ...]
    gamma: float = DEFAULT_GAMMA


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def parse_section(raw: Any) -> DressSpec:
    """Parse and validate ``ArchSpec.extra["dress"]`` = ``{"sparsities": [...], "gamma": g}``."""
    if not isinstance(raw, Mapping) or set(raw) - {"sparsities", "gamma"} or "sparsities" not in raw:
        raise DressError('extra["dress"] must be {"sparsities": [...], "gamma": g}')
    sparsities, gamma = raw["sparsities"], raw.get("gamma", DEFAULT_GAMMA)
    if isinstance(sparsities, (str, bytes, Mapping)) or not hasattr(sparsities, "__iter__") or not all(
        _number(v) for v in sparsities
    ):
        raise DressError(f'extra["dress"]["sparsities"] must be a list of numbers, got {sparsities!r}')
    if not _number(gamma):
        raise DressError(f'extra["dress"]["gamma"] must be a number, got {gamma!r}')
    spec = DressSpec(check_sparsities(tuple(float(s) for s in sparsities)), float(gamma))
    loss_weights(spec.sparsities, spec.gamma)  # validates gamma
    return spec


def spec_of(arch: ArchSpec) -> DressSpec:
    """The DRESS spec of ``arch``; raises DressError for a model without a DRESS section."""
    raw = arch.extra.get(NAME)
    if raw is None:
        raise DressError("architecture has no extra['dress'] section")
    return parse_section(raw)


class _Node(nn.Module):
    """An empty module: buffers only, placed so their names mirror the norm layers' names."""


def _child(root: nn.Module, dotted: str) -> nn.Module:
    node = root
    for part in dotted.split("."):
        if not hasattr(node, part) or not isinstance(getattr(node, part), nn.Module):
            node.add_module(part, _Node())
        node = getattr(node, part)
    return node


class DressBuffers(nn.Module):
    """Holder of the DRESS allocation and per-subnet norms (never used in forward)."""

    def __init__(self, backbone: nn.Module, spec: DressSpec) -> None:
        super().__init__()
        layers = sparse_layers(backbone)
        self.register_buffer("counts", torch.zeros(len(spec.sparsities), len(layers), dtype=torch.int64))
        norms = norm_layers(backbone)
        if norms:
            self.norm = _Node()
            for k in range(len(spec.sparsities)):
                for name, module in norms.items():
                    holder = _child(self.norm, f"{k}.{name}")
                    for key in NORM_STATE:
                        ref = getattr(module, key)
                        holder.register_buffer(key, ref.detach().clone() if ref is not None else torch.zeros(0))


def attach(backbone: nn.Module, spec: DressSpec) -> nn.Module:
    """Add the ``dress`` buffers to a freshly built backbone (in place; returns it)."""
    backbone.add_module(NAME, DressBuffers(backbone, spec))
    return backbone


def has_allocation(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds a DRESS allocation (False: never DRESS-trained, e.g. version 0,
    whose allocation is all zeros; such a model runs densely)."""
    return int(state[PREFIX + "counts"].sum()) != 0


def backbone_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith(PREFIX)}


def allocation_from_state(model: nn.Module, state: Mapping[str, torch.Tensor], spec: DressSpec) -> Allocation | None:
    """The allocation stored in ``state``, or None while it is still all zeros (untrained)."""
    counts = state[PREFIX + "counts"]
    if not has_allocation(state):
        return None
    layers = sparse_layers(model)
    rows = tuple(layer.rows for layer in layers)
    row_sizes = tuple(layer.row_size for layer in layers)
    if tuple(counts.shape) != (len(spec.sparsities), len(layers)):
        raise DressError(f"dress.counts has shape {tuple(counts.shape)}, expected {(len(spec.sparsities), len(layers))}")
    return Allocation(spec.sparsities, tuple(layer.name for layer in layers), rows, row_sizes,
                      tuple(tuple(int(c) for c in row) for row in counts.tolist()))


def norm_states_from_state(model: nn.Module, state: Mapping[str, torch.Tensor], spec: DressSpec) -> list[dict[str, torch.Tensor]] | None:
    norms = norm_layers(model)
    if not norms:
        return None
    out = []
    for k in range(len(spec.sparsities)):
        prefix = f"{PREFIX}norm.{k}."
        out.append({key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)})
    return out


@torch.no_grad()
def store_dress_state(model: nn.Module, allocation: Allocation,
                      norm_states: Sequence[Mapping[str, torch.Tensor]] | None) -> None:
    """Write an allocation and per-subnet norms into ``model.dress`` (in place)."""
    holder = model.get_submodule(NAME)
    holder.get_buffer("counts").copy_(torch.tensor(allocation.counts, dtype=torch.int64))
    if norm_states is not None:
        norm = holder.get_submodule("norm")
        for k, ns in enumerate(norm_states):
            for fqn, value in ns.items():
                name, _, key = fqn.rpartition(".")
                getattr(_child(norm, f"{k}.{name}"), key).copy_(value)


def tables_from_state(state: Mapping[str, torch.Tensor], arch: ArchSpec) -> DressTables:
    """DRESS-CSR tables of a DRESS model state (deterministic: the device's equal the server's)."""
    spec = spec_of(arch)
    plain = plain_arch(arch)
    with torch.device("meta"):
        template = build_model(plain)
    allocation = allocation_from_state(template, state, spec)
    if allocation is None:
        raise DressError("this DRESS model has no allocation yet (it was never DRESS-trained)")
    return build_dress_tables(backbone_state(state), plain, spec.sparsities, allocation=allocation,
                              norm_states=norm_states_from_state(template, state, spec))


def plain_arch(arch: ArchSpec) -> ArchSpec:
    """The same architecture without the DRESS section (the backbone alone)."""
    return ArchSpec(arch.kind, arch.input_shape, arch.num_classes, arch.hidden, arch.channels,
                    {k: v for k, v in arch.extra.items() if k != NAME})
