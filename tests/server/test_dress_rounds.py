"""DRESS fleet models through DPU rounds: every subnet is trained and scored, the diff carries
the DRESS buffers, and a device that applies the diff rebuilds bit-identical DRESS tables."""

from __future__ import annotations

import pytest

import shared.codec as codec
from server.domain.samples import LabelledData
from server.training.dpu import DPUParams, DPUPolicy, DPUState
from server.training.full import FullParams, FullRetrainPolicy
from server.training.policy import RoundInputs
from shared.data import load_dataset
from shared.dress import tables_to_bytes
from shared.dress.model_state import tables_from_state
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash

ARCH = ArchSpec("mlp", (1, 8, 8), 10, hidden=(64, 64), extra={"dress": {"sparsities": [0.5, 0.8, 0.9]}})


@pytest.fixture(scope="module")
def data():
    ds = load_dataset("digits")
    return LabelledData(ds.x_train, ds.y_train, ds.x_test, ds.y_test)


def _round(data, base, base_method, state=None, **params):
    p = DPUParams(epochs=4, batch_size=64, **params)
    return DPUPolicy().run(RoundInputs(arch=ARCH, base_state=base, base_hash=model_hash(ARCH, base), base_method=base_method,
                                       data=data, params=p, progress=lambda *a: None, state=state))


@pytest.fixture(scope="module")
def first(data):
    v0 = init_weights_from_seed(build_model(ARCH), 0).state_dict()
    out = _round(data, v0, "init")
    return v0, out


def test_first_round_trains_every_subnet(first) -> None:
    v0, out = first
    assert out.model is not None and out.metrics["variant"] == "dress-full"
    accs = out.metrics["subnet_val_accuracy"]
    assert len(accs) == 3 and min(accs) > 0.5  # chance is 0.1
    assert int(out.model["dress.counts"].sum()) > 0
    assert codec.decode_diff(out.diff, v0, base_arch=ARCH).model_hash == model_hash(ARCH, out.model)
    assert out.state.n_at_last_init == out.metrics["train_samples"]


def test_dpu_round_on_dress_rebuilds_identical_tables_on_the_device(data, first) -> None:
    _, v1 = first
    base = v1.model
    out = _round(data, base, "dpu", DPUState(n_at_last_init=10_000), k=0.05, skip_if_worse=False)
    assert out.model is not None and out.metrics["variant"] == "dpu"
    assert len(out.metrics["subnet_val_accuracy"]) == 3
    server_tables = tables_to_bytes(tables_from_state(out.model, ARCH))
    device_state = codec.decode_diff(out.diff, base, base_arch=ARCH).state  # what the agent reconstructs
    assert tables_to_bytes(tables_from_state(device_state, ARCH)) == server_tables


def test_full_round_on_dress_fits_every_subnet_and_beats_the_deployed_one(data, first) -> None:
    v0, _ = first
    p = FullParams(epochs=2, batch_size=64)
    out = FullRetrainPolicy().run(RoundInputs(arch=ARCH, base_state=v0, base_hash=model_hash(ARCH, v0), base_method="init",
                                              data=data, params=p, progress=lambda *a: None))
    assert out.model is not None and out.metrics["base_val_accuracy"] is None  # v0 is untrained
    accs = out.metrics["subnet_val_accuracy"]
    assert len(accs) == 3 and out.metrics["val_accuracy"] == sum(accs) / 3
    assert int(out.model["dress.counts"].sum()) > 0
    # Against a trained base, a full round is skipped unless its mean subnet accuracy beats it.
    again = FullRetrainPolicy().run(RoundInputs(arch=ARCH, base_state=out.model, base_hash=model_hash(ARCH, out.model),
                                                base_method="full", data=data, params=FullParams(epochs=1),
                                                progress=lambda *a: None))
    assert again.metrics["base_val_accuracy"] == out.metrics["val_accuracy"]
    assert (again.model is None) == (again.metrics["val_accuracy"] <= again.metrics["base_val_accuracy"])
