"""(Re-)initialisation of the starting weights (thesis §5.4.2, §5.5.3)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from shared.dpu.config import DPUConfigError
from shared.models import init_weights_from_seed
from shared.tensors import clone_state


def should_reinitialize(n_now: int, n_at_last_init: int) -> bool:
    """§5.4.2: start again from random weights once ``|D^{r+n}| > 2 * |D^r|``, where ``D^r`` is
    the labelled data of the round that last (re-)initialised the model.

    The round that trains from w^0 counts as an initialisation, so a server starts with
    ``n_at_last_init = |D^1|``.
    """
    if n_now < 0 or n_at_last_init < 0:
        raise DPUConfigError(
            f"sample counts must be >= 0, got n_now={n_now}, n_at_last_init={n_at_last_init}"
        )
    return n_now > 2 * n_at_last_init


def seeded_state(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The weights a device regenerates from ``seed`` alone (CPU copy; ``model`` untouched).

    Uses :func:`shared.models.init_weights_from_seed`, which is bit-identical across machines,
    so the server ships 8 bytes of seed instead of a dense random model (§5.4.2).
    """
    fresh = copy.deepcopy(model).to("cpu")
    init_weights_from_seed(fresh, seed)
    return clone_state(fresh.state_dict())
