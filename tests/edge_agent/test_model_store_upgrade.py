"""An agent upgraded from the v1 model hash (tensors only) keeps its models: the store re-keys
them to v2 durably, translates the update state, and the agent runs the same model under its
new name (docs/protocol.md, "From the v1 model hash")."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from safetensors import safe_open

from edge_agent.model_store import REKEY_MAP, V2_MARKER, ModelStore, ModelStoreError
from edge_agent.update_state import RollbackReport, State, UpdateRecord, UpdateStateFile
from shared.models import default_spec, model_hash
from shared.tensors import tensors_hash
from tests.legacy_identity import v1_full_artefact


def _v1_store(root: Path, arch, states) -> list[str]:
    """A model store as a v1 agent left it: files named by v1 hashes, each the parent of the
    next, the pointer on the last with the one before as previous. Returns the v1 hashes."""
    models = root / "models"
    models.mkdir(parents=True)
    hashes: list[str] = []
    for i, state in enumerate(states):
        data, h = v1_full_artefact(arch, state, hashes[-1] if hashes else None, extra={"round": f"r{i}"})
        (models / f"{h}.safetensors").write_bytes(data)
        hashes.append(h)
    pointer = {"model_hash": hashes[-1], "previous_hash": hashes[-2], "installed_at": 1.0}
    (root / "current.json").write_text(json.dumps(pointer))
    return hashes


def _meta(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_a_v1_store_is_rekeyed_and_keeps_running_its_model(tmp_path, make_state, tiny_arch):
    states = [make_state(s) for s in (1, 2, 3)]
    v1 = _v1_store(tmp_path, tiny_arch, states)
    v2 = [model_hash(tiny_arch, s) for s in states]
    assert v1 == [tensors_hash(s) for s in states] and not set(v1) & set(v2)

    store = ModelStore(tmp_path)
    assert store.rekeyed == dict(zip(v1, v2, strict=True))
    assert store.installed() == sorted(v2)  # the v1 files are gone
    assert (tmp_path / V2_MARKER).is_file()
    assert json.loads((tmp_path / REKEY_MAP).read_text()) == store.rekeyed
    assert (store.current_hash(), store.previous_hash()) == (v2[2], v2[1])
    current = store.current()
    assert current is not None and current.model_hash == v2[2] and current.arch == tiny_arch
    assert all((current.state[k] == v).all() for k, v in states[2].items())
    # Parents are translated too, and the file's extra metadata kept.
    meta = _meta(store.model_path(v2[2]))
    assert meta["edgeloop.parent"] == v2[1] and meta["edgeloop.model_hash"] == v2[2]
    assert meta["edgeloop.extra.round"] == "r2"
    assert _meta(store.model_path(v2[0]))["edgeloop.parent"] == ""
    # A rollback still reaches the previous model, by its new name.
    assert store.rollback() == v2[1]

    again = ModelStore(tmp_path)  # the marker makes later opens a no-op (the map stays)
    assert again.rekeyed == store.rekeyed and again.current_hash() == v2[1]


def test_the_update_state_is_translated_once(tmp_path, make_state, tiny_arch):
    states = [make_state(s) for s in (4, 5)]
    v1 = _v1_store(tmp_path, tiny_arch, states)
    gone = "e" * 64  # a rejected model whose file was collected: nothing to re-key it with
    record = UpdateRecord(state=State.COMMITTED, target_hash=v1[1], previous_hash=v1[0],
                          rollbacks=(RollbackReport(gone, "worse", 1), RollbackReport(v1[0], "worse", 2)))
    path = tmp_path / "update_state.json"
    UpdateStateFile(path).save(record)

    store = ModelStore(tmp_path)
    loaded = UpdateStateFile(path, store.rekeyed).load()
    v2 = [model_hash(tiny_arch, s) for s in states]
    assert (loaded.target_hash, loaded.previous_hash) == (v2[1], v2[0])
    assert [r.model_hash for r in loaded.rollbacks] == [gone, v2[0]]
    assert UpdateStateFile(path).load() == loaded  # written back durably


def test_an_interrupted_rekey_is_finished_at_the_next_open(tmp_path, make_state, tiny_arch, monkeypatch):
    states = [make_state(s) for s in (6, 7)]
    v1 = _v1_store(tmp_path, tiny_arch, states)
    v2 = [model_hash(tiny_arch, s) for s in states]

    def power_cut(*_a, **_k):
        raise OSError("power cut before the pointer switch")

    with monkeypatch.context() as m:
        m.setattr(ModelStore, "_write_pointer", power_cut)
        with pytest.raises(OSError):
            ModelStore(tmp_path)
    # The new files exist beside the old ones; the pointer still names v1 models, which verify.
    assert set(v1) | set(v2) == {p.name.removesuffix(".safetensors") for p in (tmp_path / "models").iterdir()}
    assert not (tmp_path / V2_MARKER).exists()
    store = ModelStore(tmp_path)
    assert store.installed() == sorted(v2) and store.current_hash() == v2[1]
    assert store.current().model_hash == v2[1]


def test_a_corrupt_v1_file_is_left_to_the_usual_fallback(tmp_path, make_state, tiny_arch):
    states = [make_state(s) for s in (8, 9)]
    v1 = _v1_store(tmp_path, tiny_arch, states)
    broken = tmp_path / "models" / f"{v1[1]}.safetensors"
    data = bytearray(broken.read_bytes())
    data[-3] ^= 0xFF
    broken.write_bytes(bytes(data))
    store = ModelStore(tmp_path)
    assert store.rekeyed == {v1[0]: model_hash(tiny_arch, states[0])}
    model = store.current()  # the pointer's model is corrupt: the previous one serves
    assert model is not None and model.model_hash == model_hash(tiny_arch, states[0])


def test_the_store_refuses_the_issue_case(tmp_path, make_state):
    """The same tensors under an edited architecture are another model: install refuses it
    against the announced hash, and the model that runs stays."""
    arch = default_spec("mlp", (1, 28, 28), 10)
    from shared.models import build_model, init_weights_from_seed

    state = {k: v.detach().clone() for k, v in init_weights_from_seed(build_model(arch), 3).state_dict().items()}
    store = ModelStore(tmp_path)
    h = store.install(arch, state, expected_hash=model_hash(arch, state))
    with pytest.raises(ModelStoreError, match="refusing to install"):
        store.install(default_spec("mlp", (784,), 10), state, expected_hash=h)
    assert store.current_hash() == h and store.current().arch == arch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_agent_runs_its_rekeyed_model(tmp_path, make_state, tiny_arch):
    from edge_agent.daemon import Agent
    from edge_agent.settings import AgentSettings

    states = [make_state(s) for s in (10, 11)]
    v1 = _v1_store(tmp_path / "models", tiny_arch, states)
    UpdateStateFile(tmp_path / "update_state.json").save(
        UpdateRecord(state=State.COMMITTED, target_hash=v1[1], previous_hash=v1[0], updated_at_ms=int(time.time())))
    settings = AgentSettings(server=f"127.0.0.1:{_free_port()}", data_dir=tmp_path, status_port=0, insecure=True,
                             battery=False, load_budget=False)
    agent = Agent(settings)
    assert agent.runner.model_hash == model_hash(tiny_arch, states[1]) and agent.runner.arch == tiny_arch
    record = UpdateStateFile(tmp_path / "update_state.json").load()
    assert record.target_hash == agent.runner.model_hash
