"""Seeded weight generation that is bit-identical across machines and languages.

torch's own RNG streams and init functions have changed between releases, and numpy's PCG64
(the v1 generator) is specified by numpy alone, so neither lets a server and a client built
with other tools agree on "the weights for seed s". Every value here comes from the
counter-based generator of :mod:`shared.models.seedgen`, keyed by (seed, tensor name), and
the rules below are normative: docs/seed-format.md spells both out byte by byte, with test
vectors (tests/vectors/seed_v2.json). The generator's name, :data:`GENERATOR`, covers these
rules too; a change to them needs a new name.

Rules, per state-dict entry of ``build_model(arch)`` (name = its state-dict key):

* any tensor of a norm layer (``BatchNorm*``, ``GroupNorm``): ``weight`` and ``running_var`` 1, ``bias``,
  ``running_mean`` and ``num_batches_tracked`` 0 (no draws);
* any other integer or bool tensor: 0;
* any other floating tensor: ``uniform(seed, name, numel, fan_in)`` in C order, with ``fan_in``
  = ``prod(shape[1:])`` of its own shape (``shape[0]`` for a 1-D tensor, 1 for a scalar), except
  that a ``bias`` takes the fan-in of its module's weight (torch's default Linear/Conv init);
* tensors a model family owns: that family's ``init_from_seed`` (DRESS: seed-independent
  constants, shared/dress/family.py), which must draw, if it draws at all, from
  :func:`shared.models.seedgen.uniform` under the tensor's own name.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from shared.models.families import families_of
from shared.models.seedgen import GENERATOR, check_seed, uniform

__all__ = ["GENERATOR", "fan_in_of", "init_weights_from_seed", "norm_start"]


def norm_start(leaf: str) -> float:
    """The value a fresh norm layer's tensor ``leaf`` starts at: 1 for the scale and the
    running variance, 0 for the rest (families with norm-like buffers start them alike)."""
    return 1.0 if leaf in ("weight", "running_var") else 0.0


def fan_in_of(shape: tuple[int, ...] | torch.Size) -> int:
    """torch's fan-in of a weight: ``prod(shape[1:])``; ``shape[0]`` for 1-D, 1 for a scalar
    (and at least 1, so an empty tensor still has a finite bound)."""
    if len(shape) >= 2:
        n = int(shape[1] * math.prod(shape[2:]))
    else:
        n = int(shape[0]) if len(shape) == 1 else 1
    return max(n, 1)


@torch.no_grad()
def init_weights_from_seed(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter and buffer of ``model`` deterministically from ``seed``.

    Each tensor draws from its own stream, keyed by the seed and the tensor's name, so the
    values depend neither on the order in which a module lists its tensors nor on which other
    layers exist. Tensors owned by a model family of ``model.arch_spec`` are left to that
    family's ``init_from_seed``, which runs afterwards. Returns ``model`` (modified in place).
    """
    seed = check_seed(seed)
    arch = getattr(model, "arch_spec", None)  # set by build_model
    families = families_of(arch) if arch is not None else []
    state = model.state_dict()
    modules = dict(model.named_modules())
    for name, tensor in state.items():
        if any(family.owns(name) for family, _ in families):
            continue  # the family initialises its own tensors below
        owner_name, _, leaf = name.rpartition(".")
        if isinstance(modules[owner_name], (nn.modules.batchnorm._NormBase, nn.GroupNorm)):
            tensor.fill_(norm_start(leaf))
            continue
        if not tensor.is_floating_point():
            tensor.zero_()
            continue
        shape = tensor.shape
        if leaf == "bias":
            prefix = f"{owner_name}." if owner_name else ""
            weight = state.get(prefix + "weight", state.get(prefix + "parametrizations.weight.original"))
            shape = weight.shape if weight is not None else shape
        values = uniform(seed, name, tensor.numel(), fan_in_of(shape))
        tensor.copy_(torch.from_numpy(values).reshape(tensor.shape))
    for family, spec in families:
        family.init_from_seed(model, spec, seed)
    return model
