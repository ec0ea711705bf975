"""DA³ on the device: the ``da3/adaptor-v1`` artefact (round trip, strict refusals, mutated
bytes), the ``da3`` learner on real digits whose camera inverts them (adapts only the adaptor
and head, refuses under a too-small memory budget), and the domain store switching between
adaptors through the real LearnerService, ModelRunner and LocalDataset. Tests wait on the
service's outcome counter, never on the clock."""

from __future__ import annotations

import json
import random
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from edge_agent.domains import Domains, DomainStore
from edge_agent.learner import LearnerService
from edge_agent.local_data import LocalDataset
from edge_agent.model_store import ModelStore
from edge_agent.runner import ModelRunner
from edge_agent.settings import AgentSettings
from shared.artefacts import ArtefactError, decode_artefact
from shared.da3 import da3_spec
from shared.da3.artefact import ADAPTOR_ENCODING, AdaptorFormatError, adaptor_names, encode_adaptor
from shared.models import ArchSpec, build_model, init_weights_from_seed, model_hash
from shared.personal import DA3LearnerConfig, LearnerRefused, make_learner
from shared.training import TrainConfig, accuracy, train_supervised

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BACKBONE = ArchSpec(kind="resnet", input_shape=(1, 8, 8), num_classes=10, hidden=(1, 1), channels=(8, 16))
WAIT = 120  # seconds; a bound on a hang, not a timing assumption


def invert(x: np.ndarray) -> np.ndarray:
    return (255 - x).astype(np.uint8)


@pytest.fixture(scope="module")
def backbone(digits):
    """The fleet backbone: a resnet pre-trained on plain digits, and its model hash."""
    torch.manual_seed(0)
    model = init_weights_from_seed(build_model(BACKBONE), 0)
    train_supervised(model, digits.x_train, digits.y_train, TrainConfig(epochs=4, lr=3e-3, seed=0))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, model_hash(BACKBONE, state)


@pytest.fixture(scope="module")
def adapted(backbone):
    """An adapted model (seeded adaptor over the backbone) and its adaptor artefact."""
    base, base_hash = backbone
    arch = da3_spec(BACKBONE)
    model = init_weights_from_seed(build_model(arch), 3)
    model.load_state_dict({k: v for k, v in base.items() if not k.startswith("head.")}, strict=False)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    data, digest = encode_adaptor(arch, state, base_hash)
    return arch, state, data, digest


# --- the artefact ------------------------------------------------------------------------------

def test_adaptor_artefact_round_trip(tmp_path, backbone, adapted):
    base, base_hash = backbone
    arch, state, data, digest = adapted
    decoded = decode_artefact(data, base, base_arch=BACKBONE)  # sniffed before the full model's
    store = ModelStore(tmp_path)  # what the agent's update machine does with it
    assert store.install(decoded.arch, decoded.state, expected_hash=digest) == digest
    assert store.current().arch == arch
    assert decoded.encoding == ADAPTOR_ENCODING and decoded.model_hash == digest == model_hash(arch, state)
    assert decoded.arch == arch and decoded.base_hash == base_hash
    owned = set(adaptor_names(arch))
    assert all(decoded.state[k] is base[k] for k in decoded.state if k not in owned)  # shared backbone
    # An adaptor for an adapted base (the next round's) replaces its adaptor tensors.
    again, digest2 = encode_adaptor(arch, state, digest)
    assert decode_artefact(again, state, base_arch=arch).model_hash == digest2 == digest
    n_full = sum(t.numel() for t in state.values())
    assert len(data) < 4 * n_full  # adaptor only: far below the float32 model


def _rewrite(data: bytes, *, meta=None, tensors=None) -> bytes:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    from safetensors.torch import load as st_load

    t = st_load(data)
    m = dict(header["__metadata__"])
    if meta:
        m.update(meta)
        m = {k: v for k, v in m.items() if v is not None}
    if tensors:
        t = tensors(t)
    return st_save(t, metadata=m)


def test_adaptor_artefact_strict_refusals(backbone, adapted):
    base, base_hash = backbone
    arch, state, data, _ = adapted
    other = ArchSpec(kind="resnet", input_shape=(1, 8, 8), num_classes=10, hidden=(1, 1), channels=(8, 8))
    cases = {
        "no base": lambda: decode_artefact(data, encoding=ADAPTOR_ENCODING),
        "another base": lambda: decode_artefact(data, {**base, "stem.0.weight": base["stem.0.weight"] + 1}
                                                if "stem.0.weight" in base else {}, base_arch=BACKBONE),
        "other backbone": lambda: decode_artefact(data, base, base_arch=other),
        "extra key": lambda: decode_artefact(_rewrite(data, meta={"edgeloop.x": "1"}), base, base_arch=BACKBONE),
        "no model hash": lambda: decode_artefact(_rewrite(data, meta={"edgeloop.model_hash": None}), base,
                                                 base_arch=BACKBONE, encoding=ADAPTOR_ENCODING),
        "bad hash": lambda: decode_artefact(_rewrite(data, meta={"edgeloop.model_hash": "0" * 64}), base,
                                            base_arch=BACKBONE),
        "non-canonical arch": lambda: decode_artefact(_rewrite(data, meta={"edgeloop.arch": " " + arch.to_json()}),
                                                      base, base_arch=BACKBONE),
        "plain arch": lambda: decode_artefact(_rewrite(data, meta={"edgeloop.arch": BACKBONE.to_json()}), base,
                                              base_arch=BACKBONE),
        "huge arch": lambda: decode_artefact(data, base, base_arch=BACKBONE, max_parameters=10),
        "missing tensor": lambda: decode_artefact(_rewrite(data, tensors=lambda t: dict(list(t.items())[1:])),
                                                  base, base_arch=BACKBONE),
        "backbone tensor": lambda: decode_artefact(_rewrite(data, tensors=lambda t: {
            **t, next(k for k in base if k not in t): torch.zeros(1)}), base, base_arch=BACKBONE),
        "wrong dtype": lambda: decode_artefact(_rewrite(data, tensors=lambda t: {
            k: v.double() for k, v in t.items()}), base, base_arch=BACKBONE),
        "wrong shape": lambda: decode_artefact(_rewrite(data, tensors=lambda t: {
            k: (v.reshape(-1) if v.ndim > 1 else v) for k, v in t.items()}), base, base_arch=BACKBONE),
        "truncated": lambda: decode_artefact(data[:-7], base, base_arch=BACKBONE, encoding=ADAPTOR_ENCODING),
    }
    for what, call in cases.items():
        with pytest.raises(ArtefactError):
            call()
            pytest.fail(what)
    with pytest.raises(AdaptorFormatError, match="applies to"):
        decode_artefact(data, {k: v + 1 if v.is_floating_point() else v for k, v in base.items()},
                        base_arch=BACKBONE)


def test_mutated_adaptor_bytes_raise_only_typed_errors(backbone, adapted):
    """Bit flips, truncations, extensions and header-length edits (the fuzz standard of
    tests/test_fuzz_install.py): every decode is refused with an ArtefactError or, for a flip
    in padding bytes only, yields exactly the signed target."""
    base, _ = backbone
    _, _, data, digest = adapted
    rng = random.Random(11)
    for i in range(160):
        b = bytearray(data)
        kind = i % 4
        if kind == 0:
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
        elif kind == 1:
            b = b[: rng.randrange(len(b))]
        elif kind == 2:
            b += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        else:
            b[:8] = struct.pack("<Q", rng.choice([0, 1, 2**63, len(b), rng.randrange(len(b))]))
        try:
            out = decode_artefact(bytes(b), base, base_arch=BACKBONE, max_parameters=1 << 20)
        except ArtefactError:
            continue
        assert out.model_hash == digest


# --- the learner -------------------------------------------------------------------------------

def test_da3_learner_adapts_to_inverted_digits(backbone, digits):
    base, _ = backbone
    before = {k: v.clone() for k, v in base.items()}
    learner = make_learner("da3")
    x, y = invert(digits.x_train[:400]), digits.y_train[:400]
    cfg = DA3LearnerConfig(epochs=12, lr=1e-2, memory_budget_mb=64.0)
    delta = learner.adapt(BACKBONE, base, x, y, cfg)
    assert all(torch.equal(base[k], before[k]) for k in base)  # the base is never modified
    assert delta.arch is not None and "da3" in delta.arch.extra
    assert sorted(delta.tensors) == adaptor_names(delta.arch)
    served = learner.apply(BACKBONE, base, delta)
    xt, yt = invert(digits.x_test), digits.y_test
    plain = build_model(BACKBONE)
    plain.load_state_dict(base)
    adapted_model = build_model(delta.arch)
    adapted_model.load_state_dict(served)
    base_acc, new_acc = accuracy(plain, xt, yt), accuracy(adapted_model, xt, yt)
    assert new_acc > base_acc + 0.15, (base_acc, new_acc)  # measured: 0.18 -> 0.45
    m = delta.meta
    assert 1 <= m["batch"] <= 32 and m["saved_bytes"] > 0 and m["analytic_bytes"] > 0
    assert 0.0 <= m["gate_sparsity"] <= 1.0 and m["seconds"] > 0


def test_da3_learner_refuses_a_too_small_memory_budget(backbone, digits):
    base, _ = backbone
    learner = make_learner("da3")
    from shared.da3 import DA3Refused, plan_training

    x, y = digits.x_train[:64], digits.y_train[:64]
    with pytest.raises(LearnerRefused, match="memory budget") as refused:
        learner.adapt(BACKBONE, base, x, y, DA3LearnerConfig(memory_budget_mb=1000 / 2**20))  # 1 kB
    assert "bytes at batch 1" in refused.value.reason
    budget = 1024  # the smallest power of two the planner accepts: a batch far below 32
    while True:
        try:
            plan_training(da3_spec(BACKBONE), budget, batch=32)
            break
        except DA3Refused:
            budget *= 2
    tight = learner.adapt(BACKBONE, base, x, y, DA3LearnerConfig(epochs=1, memory_budget_mb=budget / 2**20))
    assert 1 <= tight.meta["batch"] < 32 and tight.meta["memory_budget_bytes"] == budget
    mlp = ArchSpec("mlp", (1, 8, 8), 10, hidden=(16,))
    with pytest.raises(LearnerRefused, match="resnet"):
        learner.adapt(mlp, {}, digits.x_train[:50], digits.y_train[:50], DA3LearnerConfig())


# --- domains through the learner service -------------------------------------------------------

def _settings(tmp_path, **kw) -> AgentSettings:
    values = dict(data_dir=tmp_path, status_port=-1, learner="da3", learner_min_samples=300,
                  learner_retrain_every=0, learner_epochs=20, learner_lr=1e-2,
                  learner_poll_s=0.05, learner_max_samples=300)
    values.update(kw)
    return AgentSettings(**values)


def test_domains_switch_between_stored_adaptors(tmp_path, backbone, digits):
    base, base_hash = backbone
    store = ModelStore(tmp_path)
    assert store.install(BACKBONE, base, expected_hash=base_hash) == base_hash
    runner = ModelRunner()
    runner.load(BACKBONE, base, base_hash)
    local = LocalDataset(tmp_path / "local.db")
    settings = _settings(tmp_path, learner_domain="day", tags="domain-ignored")
    domains_store = DomainStore(store.root)
    svc = LearnerService(settings, runner, domains_store, local)
    domains = Domains(tmp_path, domains_store, setting=settings.learner_domain, tags=settings.tag_list,
                      on_change=lambda _d: svc.reconsider())
    assert (domains.active, domains.source) == ("day", "setting")
    try:
        for xi, yi in zip(invert(digits.x_train[:300]), digits.y_train[:300], strict=True):
            local.add(xi, int(yi))
        svc.start()
        assert svc.wait_outcomes(1, WAIT)
        st = svc.status()
        assert st["state"] == "serving", st
        day_hash = runner.personal_hash
        assert day_hash and st["personal_accuracy"] > st["base_accuracy"]
        m = svc.metrics()
        assert "learner_gate_sparsity" in m and "learner_saved_bytes" in m and "learner_seconds" in m
        # The operator says the device moved: its newest samples are plain digits again.
        for xi, yi in zip(digits.x_train[300:600], digits.y_train[300:600], strict=True):
            local.add(xi, int(yi))
        domains.on_put({"domain": "night"})
        assert svc.wait_outcomes(2, WAIT)
        assert domains.active == "night" and domains.switches == 1
        assert svc.status()["state"] in ("serving", "base_better")
        assert runner.personal_hash != day_hash
        # Back to "day": its stored adaptor serves again without training (checked on held-out
        # data, which is the plain digits now, so it may lose to the base: then it re-derives).
        for xi, yi in zip(invert(digits.x_train[600:900]), digits.y_train[600:900], strict=True):
            local.add(xi, int(yi))
        domains.on_put({"domain": "day"})
        assert svc.wait_outcomes(3, WAIT)
        st = svc.status()
        assert st["state"] == "serving" and st["loaded"] == 1, st
        assert runner.personal_hash == day_hash
        assert set(domains.store.stored()) >= {"day"} and domains.metrics()["learner_domain_switches"] == 2
        # The choice survives a restart; bad names are refused.
        assert Domains(tmp_path, DomainStore(store.root)).active == "day"
        with pytest.raises(ValueError):
            domains.on_put({"domain": "../x"})
        with pytest.raises(ValueError):
            domains.on_put({"name": "x"})
    finally:
        svc.stop()
        local.close()


def test_domain_from_tag_then_default(tmp_path):
    store = DomainStore(tmp_path)
    assert Domains(tmp_path, store, tags=["site-a", "domain-night"]).active == "night"
    assert Domains(tmp_path / "b", store).source == "default"


def test_put_domain_on_the_status_endpoint(tmp_path):
    import http.client

    from edge_agent.status_http import StatusServer

    domains = Domains(tmp_path, DomainStore(tmp_path))

    def call(port: int, body: bytes) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            conn.request("PUT", "/domain", body=body, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    with StatusServer(port=0, on_put_domain=domains.on_put) as server:
        code, body = call(server.port, b'{"domain": "night"}')
        assert code == 200 and body["active"] == "night" and body["source"] == "operator"
        assert call(server.port, b'{"domain": "Bad Name"}')[0] == 400
        code, body = call(server.port, b'{"domain": null}')
        assert code == 200 and body["active"] == "default"
    with StatusServer(port=0) as server:  # another learner: no domains
        assert call(server.port, b'{"domain": "x"}')[0] == 501
