"""Probation's verdict on real models and a real LocalDataset: the accuracies it compares are
those of the models as the agent runs them (checked against an independent count), a DRESS
model is judged on its densest subnet, and an untrained DRESS version 0 is no reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edge_agent.local_data import LocalDataset
from edge_agent.model_store import InstalledModel
from edge_agent.probation import ProbationConfig, accuracy, judge, untrained
from edge_agent.runner import ModelRunner
from shared.models import build_model, init_weights_from_seed, model_hash

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model(arch, state) -> InstalledModel:
    return InstalledModel(model_hash(arch, state), arch, state, Path("-"))


@pytest.fixture
def local(tmp_path, digits):
    data = LocalDataset(tmp_path / "local.db")
    for x, y in zip(digits.x_test[:150], digits.y_test[:150], strict=True):
        data.add(x, int(y))
    yield data
    data.close()


def test_accuracy_is_what_the_runner_predicts(tiny_arch, make_state, digits):
    m = _model(tiny_arch, make_state(4))
    x, y = digits.x_test[:100], digits.y_test[:100]
    net = build_model(tiny_arch)
    net.load_state_dict(m.state)
    with torch.no_grad():  # an independent count: the torch module itself, inputs scaled by 1/255
        ref = (net(torch.as_tensor(x, dtype=torch.float32) / 255).argmax(1).numpy() == y).mean()
    assert accuracy(m, x, y) == pytest.approx(ref)


def test_verdicts_on_plain_models(tiny_arch, make_state, local):
    a, b = _model(tiny_arch, make_state(4)), _model(tiny_arch, make_state(5))
    cfg = ProbationConfig(margin=0.0, min_samples=20, samples=100)
    v = judge(a, b, local, cfg)
    assert v.scores.samples == 100 and v.scores.old_accuracy is not None
    assert v.passed == (v.scores.new_accuracy >= v.scores.old_accuracy)
    assert judge(a, a, local, cfg).passed  # the same model is never worse than itself
    gap = abs(v.scores.new_accuracy - v.scores.old_accuracy)
    assert judge(a, b, local, ProbationConfig(margin=gap + 1e-9, min_samples=20, samples=100)).passed
    assert judge(b, a, local, ProbationConfig(margin=gap + 1e-9, min_samples=20, samples=100)).passed


def test_inputs_of_another_shape_count_as_no_labels(tmp_path, tiny_arch, make_state):
    other = LocalDataset(tmp_path / "other.db")
    for i in range(30):
        other.add(np.full((3, 4, 4), i, np.uint8), i % 10)
    v = judge(_model(tiny_arch, make_state(1)), _model(tiny_arch, make_state(2)), other, ProbationConfig())
    assert v.passed and "not enough local labels" in v.reason and v.scores.samples == 0
    other.close()


def test_a_dress_model_is_judged_on_its_densest_subnet(dress_model, local):
    arch = dress_model["arch"]
    trained = _model(arch, dress_model["state"])
    x, y = local.recent(100)
    dense = ModelRunner()
    dense.load(arch, trained.state, trained.model_hash, subnet=0)
    sparsest = ModelRunner()
    sparsest.load(arch, trained.state, trained.model_hash, subnet=3)
    expected = float((dense.predict(x)[0] == y).mean())
    assert accuracy(trained, x, y) == pytest.approx(expected)
    assert expected > float((sparsest.predict(x)[0] == y).mean())  # the choice matters

    v0_state = {k: v.detach().clone() for k, v in init_weights_from_seed(build_model(arch), 0)
                .state_dict().items()}
    v0 = _model(arch, v0_state)
    assert untrained(v0) and not untrained(trained)
    v = judge(trained, v0, local, ProbationConfig(margin=0.0, min_samples=20, samples=100))
    assert v.passed and v.reason == "the previous model was never trained: no reference"
    # ... while a trained DRESS model is a reference: an untrained one after it is rolled back.
    back = judge(v0, trained, local, ProbationConfig(margin=0.05, min_samples=20, samples=100))
    assert not back.passed and back.scores.old_accuracy == pytest.approx(expected)
