"""Rounds succeed on an unlucky sample count: 65 training samples in batches of 64 used to leave
a last batch of one, which a CNN's BatchNorm refused ("Expected more than 1 value per channel"),
failing a `full` round and the first DRESS round. One training sample must work too."""

from __future__ import annotations

import pytest
import torch

from server.domain.samples import LabelledData
from server.training.dpu import DPUParams, DPUPolicy
from server.training.full import FullParams, FullRetrainPolicy
from server.training.policy import RoundInputs
from shared.models import ArchSpec, build_model, default_spec, init_weights_from_seed, model_hash

SMALL_CNN = ArchSpec("cnn", (1, 28, 28), 10, hidden=(32,), channels=(8, 16))
DRESS_CNN = ArchSpec("cnn", (1, 28, 28), 10, hidden=(32,), channels=(8, 16),
                     extra={"dress": {"sparsities": [0.5, 0.8]}})  # fmt: skip
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _data(ds, n_train: int) -> LabelledData:
    return LabelledData(ds.x_train[:n_train], ds.y_train[:n_train], ds.x_test[:20], ds.y_test[:20])


def _inputs(arch: ArchSpec, data: LabelledData, params) -> tuple[RoundInputs, dict]:
    """A round on version 0 (seeded, untrained weights), recording progress calls."""
    v0 = init_weights_from_seed(build_model(arch), 0).state_dict()
    calls: list[tuple[int, int]] = []
    inputs = RoundInputs(arch=arch, base_state=v0, base_hash=model_hash(arch, v0), base_method="init",
                         data=data, params=params, progress=lambda s, t, m: calls.append((s, t)))
    return inputs, {"v0": v0, "progress": calls}


def _assert_trained(outcome, seen, n_train: int) -> None:
    assert outcome.model is not None, outcome.skip_reason
    assert outcome.metrics["train_samples"] == n_train
    assert 0.0 <= outcome.metrics["val_accuracy"] <= 1.0
    changed = [k for k, v in outcome.model.items() if not torch.equal(v, seen["v0"][k])]
    assert any(k.startswith("classifier") for k in changed)
    assert all(torch.isfinite(v).all() for v in outcome.model.values() if v.is_floating_point())
    assert seen["progress"] and seen["progress"][-1][0] == seen["progress"][-1][1]


@pytest.mark.parametrize("n_train", [65, 1])
@pytest.mark.parametrize("arch", [default_spec("cnn", (1, 28, 28), 10), DRESS_CNN],
                         ids=["plain-default-cnn", "dress-cnn"])  # fmt: skip
def test_full_round_trains_on_any_sample_count(fashion_mnist, arch, n_train):
    params = FullParams(epochs=1, batch_size=64, skip_if_worse=False, min_labelled=1)
    inputs, seen = _inputs(arch, _data(fashion_mnist, n_train), params)
    _assert_trained(FullRetrainPolicy().run(inputs), seen, n_train)


@pytest.mark.parametrize("n_train", [65, 1])
@pytest.mark.parametrize("arch", [SMALL_CNN, DRESS_CNN], ids=["plain-cnn", "dress-cnn"])
def test_first_dpu_round_trains_on_any_sample_count(fashion_mnist, arch, n_train):
    """The first round after version 0 (base_method="init") trains every weight; on a DRESS
    arch that is Alg. 3.1 in full, the round that used to fail."""
    params = DPUParams(epochs=1, batch_size=64, skip_if_worse=False, min_labelled=1)
    inputs, seen = _inputs(arch, _data(fashion_mnist, n_train), params)
    outcome = DPUPolicy().run(inputs)
    _assert_trained(outcome, seen, n_train)
    assert outcome.diff is not None
    if arch is DRESS_CNN:
        assert outcome.metrics["variant"].endswith("-full")
        assert len(outcome.metrics["subnet_val_accuracy"]) == 2
        assert int(outcome.model["dress.counts"].sum()) > 0


def test_dress_full_round_without_a_validation_split_reports_no_validation_scores(fashion_mnist):
    """Alg. 3.1 still needs a score per epoch, so without a validation split it selects on the
    training split; those scores must not come back labelled as validation accuracies."""
    ds = fashion_mnist
    data = LabelledData(ds.x_train[:65], ds.y_train[:65], ds.x_test[:0], ds.y_test[:0])
    params = FullParams(epochs=1, batch_size=64, min_labelled=1)
    inputs, seen = _inputs(DRESS_CNN, data, params)
    outcome = FullRetrainPolicy().run(inputs)
    assert outcome.model is not None and int(outcome.model["dress.counts"].sum()) > 0
    assert outcome.metrics["val_accuracy"] is None and outcome.metrics["val_samples"] == 0
    assert "subnet_val_accuracy" not in outcome.metrics
    assert len(outcome.metrics["subnet_train_accuracy"]) == 2
