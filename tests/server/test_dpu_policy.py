"""The DPU update policy: byte budgets, quantised values with error feedback, re-initialisation
published as a seed artefact plus a diff, all decodable exactly as a device would."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import shared.codec as codec
from server.domain.samples import LabelledData
from server.training.dpu import DPUParams, DPUPolicy, DPUState
from server.training.policy import RoundInputs
from shared.artefacts import decode_artefact
from shared.data import load_dataset
from shared.dpu import ShadowChain
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash
from shared.training import TrainConfig, train_supervised

ARCH = ArchSpec("mlp", (1, 8, 8), 10, hidden=(64, 64))


@pytest.fixture(scope="module")
def setup():
    ds = load_dataset("digits")
    n = len(ds.y_train)
    data = LabelledData(ds.x_train, ds.y_train, ds.x_test, ds.y_test)
    model = init_weights_from_seed(build_model(ARCH), 0)
    # A deployed model trained on a third of the data, as after an earlier round.
    train_supervised(model, ds.x_train[: n // 3], ds.y_train[: n // 3], TrainConfig(epochs=3, seed=0))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    return data, base


def _run(setup, state=None, **params):
    data, base = setup
    p = DPUParams(epochs=2, batch_size=128, skip_if_worse=False, **params)
    return DPUPolicy().run(RoundInputs(arch=ARCH, base_state=base, base_hash=model_hash(ARCH, base), base_method="dpu",
                                       data=data, params=p, progress=lambda *a: None,
                                       state=state or DPUState(n_at_last_init=10_000)))


def test_diff_decodes_to_the_published_state(setup) -> None:
    _, base = setup
    out = _run(setup, k=0.02)
    assert out.model is not None and out.diff is not None
    decoded = decode_artefact(out.diff, base, base_arch=ARCH)
    assert decoded.model_hash == model_hash(ARCH, out.model)
    assert decoded.base_hash == model_hash(ARCH, base)
    changed = sum(int((out.model[n] != base[n]).sum()) for n in base if base[n].dim() > 1)
    assert changed <= out.metrics["nnz"]


def test_byte_budget_is_respected(setup) -> None:
    out = _run(setup, byte_budget=2500)
    assert out.model is not None
    assert len(out.diff) <= 2500
    assert out.metrics["k"] < 0.1


@pytest.mark.parametrize("value_format", ["int8", "alq"])
def test_quantised_values_publish_what_the_device_reconstructs_and_carry_the_error(setup, value_format) -> None:
    _, base = setup
    out = _run(setup, k=0.05, value_format=value_format)
    assert out.model is not None
    decoded = codec.decode_diff(out.diff, base, base_arch=ARCH)
    assert decoded.model_hash == model_hash(ARCH, out.model)
    residual = out.state.residual
    assert any(float(r.abs().max()) > 0 for r in residual.values())
    # The next round absorbs the carried error where it ships values.
    again = _run(setup, state=out.state, k=0.05, value_format=value_format)
    assert again.state.residual is not None
    # fp32 values lose nothing: the residual is shipped and no longer carried.
    assert _run(setup, state=out.state, k=0.05).state.residual is None


def test_forced_reinitialisation_ships_a_diff_against_the_seeded_weights(setup) -> None:
    out = _run(setup, k=0.05, reinit=True, init_seed=7)
    if out.model is None:
        pytest.skip(f"re-initialised candidate was skipped: {out.skip_reason}")
    assert out.reinit_seed == 7
    seeded = init_weights_from_seed(build_model(ARCH), 7).state_dict()
    assert out.diff_base_hash == model_hash(ARCH, seeded)
    decoded = decode_artefact(out.diff, seeded, base_arch=ARCH)
    assert decoded.model_hash == model_hash(ARCH, out.model)


def test_unknown_params_are_refused() -> None:
    with pytest.raises(ValueError):
        DPUPolicy().parse_params({"k": 0.01, "nonsense": 1})
    with pytest.raises(ValueError):
        DPUPolicy().parse_params({"k": 0})
    with pytest.raises(ValueError):
        DPUPolicy().parse_params({"value_format": "int4"})


def test_round_inputs_arrays_are_not_modified(setup) -> None:
    data, _ = setup
    before = data.x_train.copy()
    _run(setup, k=0.01)
    assert np.array_equal(before, data.x_train)


def test_data_doubling_starts_a_reinitialised_chain(setup) -> None:
    data, base = setup
    p = DPUParams(epochs=2, batch_size=128, skip_if_worse=False, k=0.05, init_seed=3)
    out = DPUPolicy().run(RoundInputs(arch=ARCH, base_state=base, base_hash=model_hash(ARCH, base), base_method="dpu",
                                      data=data, params=p, progress=lambda *a: None,
                                      state=DPUState(n_at_last_init=len(data.y_train) // 3)))
    assert out.model is not None
    # §5.4.2: the data more than doubled, so a chain from the seeded weights starts now ...
    assert out.metrics["n_at_last_init"] == len(data.y_train) == out.state.n_at_last_init
    if out.reinit_seed is None:
        # ... and trains beside the deployed chain until it wins (§5.5.3 shadow chain).
        shadow = out.state.shadow
        assert shadow is not None and shadow.seed == 3
    else:
        assert out.reinit_seed == 3
        assert out.diff_base_hash == model_hash(ARCH, init_weights_from_seed(build_model(ARCH), 3).state_dict())


def _state() -> DPUState:
    return DPUState(
        n_at_last_init=300,
        shadow=ShadowChain(7, {"net.1.weight": torch.arange(12.0).reshape(3, 4)}, rounds=2),
        residual={"net.1.weight": torch.full((3, 4), 0.5), "net.1.bias": torch.zeros(3)},
    )


def test_state_record_round_trips_exactly() -> None:
    meta, tensors = _state().to_record()
    json.dumps(meta)  # the JSON half is JSON
    back = DPUState.from_record(json.loads(json.dumps(meta)), tensors)
    assert back.n_at_last_init == 300
    assert back.shadow.seed == 7 and back.shadow.rounds == 2
    assert torch.equal(back.shadow.state["net.1.weight"], torch.arange(12.0).reshape(3, 4))
    assert torch.equal(back.residual["net.1.weight"], torch.full((3, 4), 0.5))
    empty = DPUState.from_record(*DPUState().to_record())
    assert (empty.n_at_last_init, empty.shadow, empty.residual) == (None, None, None)


@pytest.mark.parametrize("mutate, message", [
    (lambda m, t: m.update(n_at_last_init=-1), "n_at_last_init"),
    (lambda m, t: m.update(n_at_last_init=True), "n_at_last_init"),
    (lambda m, t: m.update(extra=1), "metadata"),
    (lambda m, t: m.update(shadow={"seed": "7", "rounds": 2}), "seed"),
    (lambda m, t: m.update(shadow=None), "no shadow metadata"),
    (lambda m, t: [t.pop(k) for k in list(t) if k.startswith("shadow/")], "none of its tensors"),
    (lambda m, t: t.update({"other/x": torch.zeros(1)}), "unknown tensor"),
    (lambda m, t: t.update({"residual/x": torch.zeros(1, dtype=torch.int64)}), "float"),
])
def test_malformed_state_records_are_refused(mutate, message) -> None:
    meta, tensors = _state().to_record()
    mutate(meta, tensors)
    with pytest.raises(ValueError, match=message):
        DPUState.from_record(meta, tensors)


def test_state_that_does_not_fit_the_model_is_dropped_and_said(setup) -> None:
    data, base = setup
    stale = DPUState(10_000, ShadowChain(3, {"net.1.weight": torch.zeros(2, 2)}), None)
    out = _run(setup, state=stale, k=0.02)
    assert "shadow chain does not fit" in out.metrics["state_dropped"]
    assert out.state.shadow is None and out.state.n_at_last_init == 10_000


def test_a_skipped_round_carries_its_state(setup) -> None:
    data, base = setup
    p = DPUParams(epochs=1, batch_size=128, k=0.001, min_labelled=10**6)
    carried = _state()
    out = DPUPolicy().run(RoundInputs(arch=ARCH, base_state=base, base_hash=model_hash(ARCH, base), base_method="dpu",
                                      data=data, params=p, progress=lambda *a: None, state=carried))
    assert out.model is None and "labelled samples" in out.skip_reason
    assert out.state is carried  # nothing ran: the carried state is kept as it was


def test_a_lineage_without_carried_state_starts_the_reinit_bookkeeping(setup) -> None:
    """§5.4.2 needs |D| at the last initialisation. A lineage with no state yet (a new cohort
    building on a trained version, or state set aside) takes this round's training set as the
    reference instead of never re-initialising."""
    data, base = setup
    p = DPUParams(epochs=1, batch_size=128, skip_if_worse=False, k=0.02)
    out = DPUPolicy().run(RoundInputs(arch=ARCH, base_state=base, base_hash=model_hash(ARCH, base), base_method="dpu",
                                      data=data, params=p, progress=lambda *a: None, state=None))
    assert out.model is not None and out.reinit_seed is None and out.state.shadow is None
    assert out.state.n_at_last_init == out.metrics["n_at_last_init"] == len(data.y_train)
