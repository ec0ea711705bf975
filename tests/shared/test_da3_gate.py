"""DA³ gate training schedules (shared/da3/train.py): beta and T annealed over the run, the
density penalty with a target, and their validation; on the small resnet of test_da3.py."""

from __future__ import annotations

import pytest
import torch

from shared.da3 import DA3Error, DA3TrainConfig, evaluate_domain, train_domain
from shared.da3.train import density_penalty, geometric_schedule
from tests.shared.test_da3 import _data, _model


def test_geometric_schedule_runs_from_start_to_end() -> None:
    assert geometric_schedule(1.0, None, 5, 10) == 1.0
    assert geometric_schedule(1.0, 8.0, 0, 10) == 1.0
    assert geometric_schedule(1.0, 8.0, 9, 10) == pytest.approx(8.0)
    assert geometric_schedule(1.0, 8.0, 50, 10) == pytest.approx(8.0)  # clamped past the end
    mid = [geometric_schedule(1.0, 8.0, s, 4) for s in range(4)]
    assert mid == pytest.approx([1.0, 2.0, 4.0, 8.0])  # geometric: equal ratios


def test_density_penalty_with_and_without_target() -> None:
    d = [torch.tensor(0.9), torch.tensor(0.4), torch.tensor(0.7)]
    assert float(density_penalty(d, None)) == pytest.approx(2.0 / 3.0)
    # Only blocks above the target pay, quadratically.
    assert float(density_penalty(d, 0.5)) == pytest.approx((0.4**2 + 0.2**2) / 3)


def test_training_anneals_beta_and_temperature_then_restores_beta() -> None:
    model = _model("da3")
    seen: list[tuple[float, float]] = []
    gate_forward = model._correction

    def spy(s, mod, x):  # noqa: ANN001, ANN202 - records what each training forward used
        if model.training:
            seen.append((model.beta, model.temperature))
        return gate_forward(s, mod, x)

    model._correction = spy
    x, y = _data()
    train_domain(model, x, y, DA3TrainConfig(method="da3", epochs=2, batch=8, lr=1e-2, beta_final=4.0,
                                             temperature_final=0.25, sparsity_weight=0.5, density_target=0.5))
    betas = [b for b, _ in seen]
    temps = [t for _, t in seen]
    assert betas[0] == pytest.approx(model.section.beta) and betas[-1] == pytest.approx(4.0)
    assert temps[0] == pytest.approx(model.section.temperature) and temps[-1] == pytest.approx(0.25)
    assert betas == sorted(betas) and temps == sorted(temps, reverse=True)
    assert model.beta == model.section.beta  # the model's own value again after training
    assert 0 <= evaluate_domain(model, x, y)["gate_sparsity"] <= 1


def test_schedule_settings_are_validated() -> None:
    for bad in ({"beta_final": 0}, {"beta_final": float("nan")}, {"temperature_final": -1},
                {"density_target": 1.0}, {"density_target": -0.1}):
        with pytest.raises(DA3Error):
            DA3TrainConfig(**bad)
