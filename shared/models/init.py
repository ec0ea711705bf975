"""Seeded weight generation that is bit-identical across machines.

torch's own RNG streams and init functions have changed between releases, so a server and a
device with different torch builds could disagree on "the weights for seed s". Here every
tensor is drawn from numpy's PCG64 (whose stream numpy guarantees stable) in float64 and
rounded once to float32, so the result depends only on (architecture spec, seed).

Limits: the bit stream is stable for numpy >= 1.17 (``Generator`` API); the distributions
mirror torch's defaults (uniform +-1/sqrt(fan_in) for weights and biases, ones/zeros for norm
layers), not any other init scheme.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from shared.models.families import families_of


def norm_start(leaf: str) -> float:
    """The value a fresh norm layer's tensor ``leaf`` starts at: 1 for the scale and the
    running variance, 0 for the rest (families with norm-like buffers start them alike)."""
    return 1.0 if leaf in ("weight", "running_var") else 0.0


def _fan_in(shape: torch.Size) -> int:
    return int(shape[1] * math.prod(shape[2:])) if len(shape) >= 2 else int(shape[0])


def _stream(seed: int, name: str) -> np.random.SeedSequence:
    words = hashlib.sha256(name.encode("utf-8")).digest()
    return np.random.SeedSequence(seed, spawn_key=tuple(int.from_bytes(words[i : i + 4], "little") for i in (0, 4, 8, 12)))


@torch.no_grad()
def init_weights_from_seed(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter and buffer of ``model`` deterministically from ``seed``.

    Each tensor draws from its own stream, keyed by the seed and the tensor's name
    (``SeedSequence(seed, spawn_key=sha256(name))``), so the values depend neither on the order
    in which a module happens to list its tensors (reparametrizing a weight, e.g. for pruning
    masks, moves it after its bias) nor on which other layers exist. Tensors owned by a model
    family of ``model.arch_spec`` are left to that family's ``init_from_seed``, which runs
    afterwards. Returns ``model`` (modified in place).
    """
    if not 0 <= seed < 2**63:
        raise ValueError(f"seed must lie in [0, 2**63), got {seed}")
    arch = getattr(model, "arch_spec", None)  # set by build_model
    families = families_of(arch) if arch is not None else []
    state = model.state_dict()
    modules = dict(model.named_modules())
    for name, tensor in state.items():
        if any(family.owns(name) for family, _ in families):
            continue  # the family initialises its own tensors below
        stream = _stream(seed, name)
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        if isinstance(owner, nn.modules.batchnorm._NormBase):
            tensor.fill_(norm_start(leaf))
            continue
        if not tensor.is_floating_point():
            tensor.zero_()
            continue
        if leaf == "bias":
            weight = state[f"{owner_name}.weight"] if owner_name else None
            fan_in = _fan_in(weight.shape) if weight is not None else tensor.numel()
        else:
            fan_in = _fan_in(tensor.shape)
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        u = np.random.Generator(np.random.PCG64(stream)).random(tensor.numel())  # [0, 1) float64
        values = ((2.0 * u - 1.0) * bound).astype(np.float32).reshape(tuple(tensor.shape))
        tensor.copy_(torch.from_numpy(values))
    for family, spec in families:
        family.init_from_seed(model, spec, seed)
    return model
