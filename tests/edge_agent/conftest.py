"""Shared fixtures for the edge agent tests: a small real dataset and tiny real models."""

from __future__ import annotations

import pytest
import torch

from shared.data import load_dataset
from shared.models import ArchSpec, build_model, init_weights_from_seed


@pytest.fixture(scope="session")
def digits():
    """UCI hand-written digits (1438 train images, 1x8x8 uint8): real sensor-like inputs."""
    return load_dataset("digits")


@pytest.fixture(scope="session")
def tiny_arch() -> ArchSpec:
    return ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,))


@pytest.fixture(scope="session")
def make_state(tiny_arch):
    """``make_state(seed)``: the seeded weights of ``tiny_arch`` (distinct seeds, distinct models)."""

    def make(seed: int) -> dict[str, torch.Tensor]:
        model = build_model(tiny_arch)
        init_weights_from_seed(model, seed)
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    return make
