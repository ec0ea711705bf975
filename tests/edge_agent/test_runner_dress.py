"""ModelRunner on a real DRESS model trained on digits: subnets switch, match the masked model,
and are profiled on this CPU; plain and untrained DRESS models run as before."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from edge_agent.governor import DEFAULT_PJ_PER_FLOP
from edge_agent.profiling import ProfilingError, profile_subnets, subnet_memory_mb
from edge_agent.runner import ModelRunner, SubnetError
from shared.data import load_dataset
from shared.dress import DressConfig, SubnetMasks, subnet_flops, train_dress
from shared.dress.model_state import plain_arch, store_dress_state
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash
from shared.tensors import to_model_input

SPARSITIES = (0.5, 0.8, 0.9, 0.95)
ARCH = ArchSpec("mlp", (1, 8, 8), 10, hidden=(64,),
                extra={"dress": {"sparsities": list(SPARSITIES), "gamma": 0.5}})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def trained():
    """A DRESS MLP trained on digits (Alg. 3.1, short) stored as one DRESS state dict, plus the
    trained backbone and allocation for the reference masked model. About 1.5 s."""
    torch.set_num_threads(1)
    ds = load_dataset("digits")
    backbone = init_weights_from_seed(build_model(plain_arch(ARCH)), 0)
    cfg = DressConfig(sparsities=SPARSITIES, pretrain_epochs=3, epochs=3, norm_epochs=0,
                      batch_size=64)
    res = train_dress(backbone, ds.x_train, ds.y_train, ds.x_test, ds.y_test, cfg)
    model = build_model(ARCH)
    model.load_state_dict({**model.state_dict(), **res.state})
    store_dress_state(model, res.allocation, res.norm_states)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"ds": ds, "res": res, "state": state, "hash": model_hash(ARCH, state)}


def _runner(trained, subnet=None) -> ModelRunner:
    r = ModelRunner()
    r.load(ARCH, trained["state"], trained["hash"], subnet=subnet)
    return r


def _masked_logits(trained, k: int, x: np.ndarray) -> torch.Tensor:
    """The training-time view of subnet k: the backbone with DRESS masks w ⊙ m_k (Eq. 3.3)."""
    model = build_model(plain_arch(ARCH))
    model.load_state_dict(trained["res"].state)
    model.eval()
    with SubnetMasks(model, trained["res"].allocation) as masks, torch.no_grad():
        masks.set_subnet(k)
        return model(to_model_input(x))


def test_subnets_match_the_dense_masked_model(trained):
    x = trained["ds"].x_test
    y = trained["ds"].y_test
    r = _runner(trained)
    assert r.is_dress and r.num_subnets == len(SPARSITIES) and r.tables is not None
    preds = []
    for k in range(r.num_subnets):
        assert r.set_subnet(k) is True
        assert r.active_subnet == k and r.describe()["active_subnet"] == k
        pred, conf = r.predict(x)
        ref = _masked_logits(trained, k, x)
        np.testing.assert_array_equal(pred, ref.argmax(1).numpy())
        np.testing.assert_allclose(conf, torch.softmax(ref, 1).max(1).values.numpy(), atol=1e-5)
        preds.append(pred)
    accs = [float(np.mean(p == y)) for p in preds]
    assert accs[0] > 0.8, accs  # a trained model, not noise
    assert not np.array_equal(preds[0], preds[-1])  # switching really changes the network
    assert accs[0] >= accs[-1] - 0.02  # the densest subnet is not the worst


def test_switching_copies_no_weights(trained):
    r = _runner(trained, subnet=0)
    tables = r.tables
    ptrs = {name: t.untyped_storage().data_ptr() for name, t in tables.tensors.items()}
    for k in (3, 1, 2, 0):
        r.set_subnet(k)
        for op in r._dress._ops:  # the active subnet's weights are views of the tables
            if op.kind in ("conv", "fc"):
                assert op.value.untyped_storage().data_ptr() == ptrs[f"{op.layer.name}.value"]
                assert op.value.shape[1] == op.layer.counts[k]
    assert {n: t.untyped_storage().data_ptr() for n, t in r.tables.tensors.items()} == ptrs


@pytest.mark.parametrize("bad", [-1, 4, 1.0, True, "1", None])
def test_set_subnet_rejects_bad_k(trained, bad):
    r = _runner(trained, subnet=2)
    with pytest.raises(SubnetError, match="subnet must be an int in \\[0, 4\\)"):
        r.set_subnet(bad)
    assert r.active_subnet == 2


def test_load_picks_the_starting_subnet(trained):
    r = _runner(trained)
    assert r.active_subnet == len(SPARSITIES) - 1  # the cheapest until the governor decides
    r.set_subnet(1)
    r.load(ARCH, trained["state"], trained["hash"])  # an update keeps the running subnet
    assert r.active_subnet == 1
    with pytest.raises(SubnetError):
        r.load(ARCH, trained["state"], trained["hash"], subnet=7)
    assert r.active_subnet == 1 and r.model_hash == trained["hash"]  # failed load: old model stays


def test_set_subnet_for_another_model_is_ignored(trained):
    r = _runner(trained, subnet=3)
    assert r.set_subnet(0, model_hash="0" * 64) is False
    assert r.active_subnet == 3
    assert r.set_subnet(0, model_hash=trained["hash"]) is True
    assert r.active_subnet == 0


def test_predictions_always_match_the_subnet_reported(trained):
    """Switching from another thread never mixes two subnets within one forward."""
    x = trained["ds"].x_test[:64]
    r = _runner(trained)
    expected = {k: _masked_logits(trained, k, x).argmax(1).numpy() for k in range(4)}
    stop = threading.Event()

    def switch() -> None:
        i = 0
        while not stop.is_set():
            r.set_subnet(i % 4)
            i += 1

    t = threading.Thread(target=switch)
    t.start()
    seen = set()
    try:
        for _ in range(200):
            p = r.predict_timed(x)
            seen.add(p.subnet)
            np.testing.assert_array_equal(p.pred, expected[p.subnet])
            assert p.model_hash == trained["hash"] and p.forward_ms > 0
    finally:
        stop.set()
        t.join()
    assert len(seen) > 1


def test_plain_model_unaffected(make_state, tiny_arch, digits):
    state = make_state(3)
    r = ModelRunner()
    r.load(tiny_arch, state, model_hash(tiny_arch, state))
    assert not r.is_dress and r.active_subnet == -1 and r.num_subnets == 0 and r.tables is None
    model = build_model(tiny_arch)
    model.load_state_dict(state)
    with torch.no_grad():
        ref = model(to_model_input(digits.x_test))
    pred, conf = r.predict(digits.x_test)
    np.testing.assert_array_equal(pred, ref.argmax(1).numpy())
    np.testing.assert_allclose(conf, torch.softmax(ref, 1).max(1).values.numpy(), rtol=1e-6)
    assert r.predict_timed(digits.x_test[:1]).subnet == -1
    with pytest.raises(SubnetError, match="no DRESS subnets"):
        r.set_subnet(0)
    with pytest.raises(ProfilingError, match="no DRESS subnets"):
        profile_subnets(r, reps=5)


def test_untrained_dress_model_runs_densely(digits):
    """The server's version 0: DRESS arch, allocation still zeros -> the dense backbone."""
    model = init_weights_from_seed(build_model(ARCH), 1)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    r = ModelRunner()
    r.load(ARCH, state, model_hash(ARCH, state))
    assert r.ready and not r.is_dress and r.active_subnet == -1
    model.eval()
    with torch.no_grad():
        ref = model(to_model_input(digits.x_test[:50])).argmax(1).numpy()
    np.testing.assert_array_equal(r.predict(digits.x_test[:50])[0], ref)
    with pytest.raises(SubnetError):
        r.set_subnet(0)


def test_swap_between_plain_and_dress(trained, make_state, tiny_arch, digits):
    r = _runner(trained, subnet=0)
    plain = make_state(4)
    r.load(tiny_arch, plain, model_hash(tiny_arch, plain))
    assert r.active_subnet == -1 and r.tables is None
    r.load(ARCH, trained["state"], trained["hash"])
    assert r.active_subnet == 3 and r.is_dress  # no subnet to keep: the cheapest


def test_profiles_follow_flops(trained):
    r = _runner(trained, subnet=1)
    profiles = profile_subnets(r, reps=20)
    assert r.active_subnet == 1  # profiling times a private runner, never the live one
    tables = r.tables
    assert [p.index for p in profiles] == [0, 1, 2, 3]
    assert [p.sparsity for p in profiles] == list(SPARSITIES)
    flops = [p.flops for p in profiles]
    assert flops == [subnet_flops(tables, k)["flops"] for k in range(4)]
    assert all(a > b for a, b in zip(flops, flops[1:], strict=False))
    # 2 * nonzeros of the 64->64->10 MLP: realised sparsity within the allocation tolerance.
    dense = 2 * (64 * 64 + 64 * 10)
    for p in profiles:
        assert abs(1 - p.flops / dense - p.sparsity) < 0.01
        assert p.energy_source == "flops-proxy"
        assert p.energy_mj == pytest.approx(p.flops * DEFAULT_PJ_PER_FLOP * 1e-9)
        assert 0 < p.latency_p50_ms <= p.latency_p95_ms
    memory = [p.peak_memory_mb for p in profiles]
    assert all(a > b for a, b in zip(memory, memory[1:], strict=False))
    assert memory[0] == subnet_memory_mb(tables, 0)
    measured = profile_subnets(r, reps=5, power_w=2.0)
    for p in measured:
        assert p.energy_source == "measured"
        assert p.energy_mj == pytest.approx(2.0 * p.latency_p50_ms)
    with pytest.raises(ProfilingError, match="reps"):
        profile_subnets(r, reps=0)
