"""The update machine on real parts: a real ModelStore and runner on disk, real artefacts
(``shared.artefacts``), real models (a tiny MLP trained on digits, and an untrained one), a
real LocalDataset of labelled digits. Only the network is replaced, by :class:`ArtefactServer`
below, which serves GetUpdate from memory (tests/edge_agent/test_updater.py drives the same
machine against a real gRPC server).

Failure injection is table-driven, as Mender's state tests are: for every working state, the
handler raises (``raise``) or the process dies there (``kill``: a BaseException no handler
catches, then a fresh machine on the same directory), and the exact chain of persisted
states and the model that ends up serving are asserted.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent import update_machine
from edge_agent.client import PermanentError, TransientError
from edge_agent.local_data import LocalDataset
from edge_agent.model_store import ModelStore
from edge_agent.probation import ProbationConfig
from edge_agent.runner import ModelRunner
from edge_agent.trust import TrustStore
from edge_agent.update_machine import UpdateContext, UpdateMachine
from edge_agent.update_state import MAX_REASON, State, UpdateStateError, UpdateStateFile
from edge_agent.updater import Updater
from protos.edgeloop.v1 import fleet_pb2 as pb
from shared.artefacts import FULL_MODEL_ENCODING, encode_full_model
from shared.models import build_model, init_weights_from_seed
from shared.signing import raw_public_key, sign_artefact

S = State
CHUNK = 1024
CONFIG = ProbationConfig(margin=0.05, min_samples=20, samples=200)


class ArtefactServer:
    """GetUpdate over in-memory full-model artefacts, resuming at the requested offset like
    the real servicer; ``cut_after`` drops the link after that many chunks once."""

    def __init__(self) -> None:
        self.artefacts: dict[str, bytes] = {}
        self.cut_after: int | None = None
        self.requests: list[tuple[str, int]] = []
        self.key = Ed25519PrivateKey.generate()  # signs every artefact, as the real server does
        self.public_key = raw_public_key(self.key)

    def publish(self, arch, state) -> str:
        data, digest = encode_full_model(arch, state)
        self.artefacts[digest] = data
        return digest

    def get_update(self, req: pb.GetUpdateRequest, timeout_s=None):
        self.requests.append((req.artefact_sha256, req.offset))
        data = self.artefacts.get(req.target_model_hash)
        if data is None:
            raise PermanentError(f"NOT_FOUND: {req.target_model_hash[:12]}")
        sha = hashlib.sha256(data).hexdigest()
        offset = req.offset if req.artefact_sha256 == sha else 0
        kid, signature = sign_artefact(self.key, artefact_sha256=sha, encoding=FULL_MODEL_ENCODING, size=len(data),
                                       target_model_hash=req.target_model_hash, base_model_hash=None)
        yield pb.GetUpdateResponse(info=pb.UpdateInfo(
            artefact_sha256=sha, artefact_size=len(data), encoding=FULL_MODEL_ENCODING,
            target_model_hash=req.target_model_hash, final_model_hash=req.target_model_hash,
            offset=offset, signatures=[pb.ArtefactSignature(key_id=kid, signature=signature)]))
        for n, pos in enumerate(range(offset, len(data), CHUNK)):
            if self.cut_after is not None and n >= self.cut_after:
                self.cut_after = None
                raise TransientError("UNAVAILABLE: link dropped")
            yield pb.GetUpdateResponse(chunk=pb.Chunk(offset=pos, data=data[pos: pos + CHUNK]))


class RecordingFile(UpdateStateFile):
    """The real state file, plus the chain of states written to it."""

    def __init__(self, path: Path, chain: list[str]) -> None:
        super().__init__(path)
        self.chain = chain

    def save(self, record) -> None:
        super().save(record)
        self.chain.append(record.state.value)


class Killed(BaseException):
    """The process dies here: nothing in the agent catches a BaseException."""


class FailingLoadRunner(ModelRunner):
    """A device on which one particular model does not load (say, out of memory)."""

    def __init__(self, bad_hash: str) -> None:
        super().__init__()
        self.bad_hash = bad_hash

    def load(self, arch, state, model_hash, subnet=None):
        if model_hash == self.bad_hash:
            raise RuntimeError("out of memory (simulated); " + "allocator detail " * 300)
        super().load(arch, state, model_hash, subnet)


@dataclass
class Agent:
    """What the daemon builds at start-up, reduced to the update path."""

    store: ModelStore
    runner: ModelRunner
    machine: UpdateMachine
    chain: list[str]


def boot(root: Path, server: ArtefactServer, local: LocalDataset, *, runner: ModelRunner | None = None,
         config: ProbationConfig = CONFIG, max_resumes: int = 3) -> Agent:
    store = ModelStore(root / "models")
    runner = runner or ModelRunner()
    current = store.current()
    if current is not None:
        try:
            runner.load(current.arch, current.state, current.model_hash)
        except RuntimeError:  # as the daemon does: logged; the update machine sorts it out
            pass
    trust = TrustStore(root)
    trust.pin_at_enrollment([server.public_key])
    updater = Updater(server, root, max_artefact_bytes=1 << 24, chunk_bytes=CHUNK, trust=trust)
    chain: list[str] = []
    machine = UpdateMachine(UpdateContext(updater, store, runner, local, config),
                            RecordingFile(root / "update_state.json", chain), max_resumes=max_resumes)
    return Agent(store, runner, machine, chain)


@pytest.fixture(scope="module")
def good_state(tiny_arch, digits):
    """The tiny MLP trained a few epochs on digits (about 90 % on the test split)."""
    torch.manual_seed(0)
    model = init_weights_from_seed(build_model(tiny_arch), 3)
    x = torch.as_tensor(digits.x_train, dtype=torch.float32) / 255.0
    y = torch.as_tensor(digits.y_train, dtype=torch.long)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        for i in range(0, len(y), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i: i + 128]), y[i: i + 128]).backward()
            opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def local(tmp_path, digits):
    """200 labelled digits the device saw (its own, never uploaded by this store)."""
    data = LocalDataset(tmp_path / "local_data.db", max_items=500)
    for x, y in zip(digits.x_test[:200], digits.y_test[:200], strict=True):
        data.add(x, int(y))
    yield data
    data.close()


@pytest.fixture
def world(tmp_path, tiny_arch, good_state, make_state, local):
    server = ArtefactServer()
    good = server.publish(tiny_arch, good_state)
    bad = server.publish(tiny_arch, make_state(11))  # untrained: about 10 %
    return {"server": server, "good": good, "bad": bad, "root": tmp_path / "agent", "local": local,
            "states": {good: good_state, bad: make_state(11)}}


def _install(world, agent: Agent, model_hash: str) -> None:
    """Put ``model_hash`` in place as the model running before the update."""
    from shared.artefacts import decode_artefact

    decoded = decode_artefact(world["server"].artefacts[model_hash])
    agent.store.install(decoded.arch, decoded.state, expected_hash=model_hash)
    agent.runner.load(decoded.arch, decoded.state, model_hash)


def _agent_on(world, old: str | None, **kw) -> Agent:
    agent = boot(world["root"], world["server"], world["local"], **kw)
    if old is not None:
        _install(world, agent, old)
    return agent


def _update(agent: Agent, target: str) -> State:
    agent.machine.start(target)
    return agent.machine.run(target)


FORWARD = ["downloading", "verifying", "installing", "probation"]


# --- probation --------------------------------------------------------------------------------


def test_a_better_version_is_committed(world):
    agent = _agent_on(world, world["bad"])
    assert _update(agent, world["good"]) is S.COMMITTED
    assert agent.chain == [*FORWARD, "committed"]
    assert agent.store.current_hash() == agent.runner.model_hash == world["good"]
    rec = agent.machine.record
    assert rec.previous_hash == world["bad"] and rec.target_hash == world["good"]
    p = rec.probation
    assert p.samples == 200 and p.new_accuracy > 0.8 and p.old_accuracy < 0.3
    assert "vs previous" in rec.reason
    assert agent.machine.scores[world["good"]] == pytest.approx(p.new_accuracy)
    assert UpdateStateFile(world["root"] / "update_state.json").load() == rec  # persisted as is


def test_a_worse_version_is_rolled_back_reported_and_never_retried(world, digits):
    agent = _agent_on(world, world["good"])
    before = agent.runner.predict(digits.x_test[200:300])
    assert _update(agent, world["bad"]) is S.ROLLED_BACK
    assert agent.chain == [*FORWARD, "rolling_back", "rolled_back"]
    # The old model serves again, from memory and from disk.
    assert agent.store.current_hash() == agent.runner.model_hash == world["good"]
    after = agent.runner.predict(digits.x_test[200:300])
    assert (before[0] == after[0]).all()
    report = agent.machine.rejected(world["bad"])
    assert report is not None and "below the previous model's" in report.reason
    assert agent.machine.record.reason == report.reason
    assert agent.machine.record.probation.new_accuracy < agent.machine.record.probation.old_accuracy - 0.05
    with pytest.raises(UpdateStateError, match="not retried"):
        agent.machine.start(world["bad"])
    # A restarted agent still runs the old model and still refuses the rejected one.
    again = boot(world["root"], world["server"], world["local"])
    assert again.runner.model_hash == world["good"] and again.machine.state is S.ROLLED_BACK
    assert again.machine.rejected(world["bad"]).reason == report.reason
    # A different target is accepted again.
    better = world["server"].publish(agent.runner.arch, {k: v * 1.001 for k, v in world["states"][world["good"]].items()})
    assert _update(again, better) is S.COMMITTED


@pytest.mark.parametrize("margin, expected", [(0.05, S.ROLLED_BACK), (1.0, S.COMMITTED)])
def test_the_margin_decides(world, margin, expected):
    agent = _agent_on(world, world["good"], config=ProbationConfig(margin=margin, min_samples=20, samples=200))
    assert _update(agent, world["bad"]) is expected
    assert agent.runner.model_hash == (world["good"] if expected is S.ROLLED_BACK else world["bad"])


def test_too_few_local_labels_commit_without_judging(tmp_path, world, digits):
    few = LocalDataset(tmp_path / "few.db")
    for x, y in zip(digits.x_test[:5], digits.y_test[:5], strict=True):
        few.add(x, int(y))
    agent = boot(world["root"], world["server"], few)
    _install(world, agent, world["good"])
    assert _update(agent, world["bad"]) is S.COMMITTED
    assert "not enough local labels" in agent.machine.record.reason
    assert agent.machine.record.probation.samples == 5
    few.close()


def test_the_first_model_has_nothing_to_compare_with(world):
    agent = _agent_on(world, None)
    assert _update(agent, world["bad"]) is S.COMMITTED
    assert agent.machine.record.reason == "no previous model to compare with"
    assert agent.machine.record.previous_hash == ""


def test_a_model_that_fails_to_load_is_rolled_back(world):
    agent = _agent_on(world, world["good"], runner=FailingLoadRunner(world["bad"]))
    assert _update(agent, world["bad"]) is S.ROLLED_BACK
    assert agent.chain == ["downloading", "verifying", "installing", "rolling_back", "rolled_back"]
    reason = agent.machine.rejected(world["bad"]).reason
    assert "fails to load" in reason and "out of memory" in reason
    assert len(reason) <= MAX_REASON  # a long exception text still fits a heartbeat
    assert agent.store.current_hash() == agent.runner.model_hash == world["good"]


def test_a_changed_target_aborts_the_download(world):
    agent = _agent_on(world, world["bad"])
    agent.machine.start(world["good"])
    assert agent.machine.run("c" * 64) is S.IDLE  # the server moved on before we fetched
    assert "now names" in agent.machine.record.reason and agent.runner.model_hash == world["bad"]
    assert _update(agent, world["good"]) is S.COMMITTED


def test_an_interrupted_download_is_suspended_and_resumes(world):
    world["server"].cut_after = 3
    agent = _agent_on(world, world["bad"])
    agent.machine.start(world["good"])
    assert agent.machine.run(world["good"]) is S.DOWNLOADING  # suspended, part file kept
    assert agent.runner.model_hash == world["bad"]
    assert agent.machine.run(world["good"]) is S.COMMITTED
    assert [off for _, off in world["server"].requests] == [0, 3 * CHUNK]
    assert agent.chain == ["downloading", "downloading", "verifying", "installing", "probation", "committed"]


def test_an_unknown_target_fails_and_leaves_the_old_model(world):
    agent = _agent_on(world, world["good"])
    assert _update(agent, "d" * 64) is S.FAILED
    assert "NOT_FOUND" in agent.machine.record.reason and agent.runner.model_hash == world["good"]
    assert agent.machine.rejected("d" * 64) is None  # a failure is retried later, not blacklisted


# --- failure injection: every working state x {raise, kill} ---------------------------------------

# (state, scenario) -> chain when its handler raises, then the model that serves.
RAISE = {
    S.DOWNLOADING: (["downloading", "failed"], "old"),
    S.VERIFYING: (["downloading", "verifying", "failed"], "old"),
    S.INSTALLING: (["downloading", "verifying", "installing", "rolling_back", "rolled_back"], "old"),
    S.PROBATION: ([*FORWARD, "rolling_back", "rolled_back"], "old"),
    # The rollback itself raising is retried (a second run finishes it).
    S.ROLLING_BACK: ([*FORWARD, "rolling_back", "rolling_back", "rolled_back"], "old"),
}

# (state) -> chain a restarted agent writes after dying in it, and its final state.
KILL = {
    S.DOWNLOADING: (["downloading", "verifying", "installing", "probation", "committed"], S.COMMITTED),
    S.VERIFYING: (["downloading", "verifying", "installing", "probation", "committed"], S.COMMITTED),
    S.INSTALLING: (["failed"], S.FAILED),  # died before the switch: nothing to keep
    S.PROBATION: (["probation", "committed"], S.COMMITTED),
    S.ROLLING_BACK: (["rolling_back", "rolled_back"], S.ROLLED_BACK),
}


def _scenario(world, state: State) -> tuple[str, str]:
    """(old, target): a rollback needs a worse target, every other state a better one."""
    if state is S.ROLLING_BACK:
        return world["good"], world["bad"]
    return world["bad"], world["good"]


def _inject(monkeypatch, state: State, exc: BaseException) -> list[int]:
    calls = []
    real = update_machine._HANDLERS[state]

    def handler(m, wanted):
        calls.append(1)
        if len(calls) == 1:
            raise exc
        return real(m, wanted)

    monkeypatch.setitem(update_machine._HANDLERS, state, handler)
    return calls


@pytest.mark.parametrize("state", list(RAISE), ids=lambda s: s.value)
def test_error_in_state(world, monkeypatch, state):
    old, target = _scenario(world, state)
    agent = _agent_on(world, old)
    _inject(monkeypatch, state, RuntimeError(f"injected in {state.value}"))
    final = _update(agent, target)
    if state is S.ROLLING_BACK:
        assert final is S.ROLLING_BACK  # suspended; the updater service retries it
        final = agent.machine.run(target)
    chain, serving = RAISE[state]
    assert agent.chain == chain
    assert final is State(chain[-1])
    assert agent.store.current_hash() == agent.runner.model_hash == (old if serving == "old" else target)
    rolled_back = chain[-1] == "rolled_back"
    assert (agent.machine.rejected(target) is not None) is rolled_back


@pytest.mark.parametrize("state", list(KILL), ids=lambda s: s.value)
def test_killed_in_state(world, monkeypatch, state):
    old, target = _scenario(world, state)
    agent = _agent_on(world, old)
    _inject(monkeypatch, state, Killed())
    with pytest.raises(Killed):
        _update(agent, target)
    assert UpdateStateFile(world["root"] / "update_state.json").load().state is state  # persisted first

    restarted = boot(world["root"], world["server"], world["local"])
    final = restarted.machine.run(target)
    chain, expected = KILL[state]
    assert restarted.chain == chain and final is expected
    if expected is S.FAILED:  # the updater service starts it again later
        assert restarted.runner.model_hash == old
        assert _update(restarted, target) is S.COMMITTED
        expected = S.COMMITTED
    serving = old if expected is S.ROLLED_BACK else target
    assert restarted.store.current_hash() == restarted.runner.model_hash == serving


def test_killed_after_the_pointer_switch_resumes_probation(world, monkeypatch):
    agent = _agent_on(world, world["bad"])
    real_install = agent.store.install

    def install_then_die(*a, **kw):
        real_install(*a, **kw)
        raise Killed()

    monkeypatch.setattr(agent.store, "install", install_then_die)
    with pytest.raises(Killed):
        _update(agent, world["good"])
    restarted = boot(world["root"], world["server"], world["local"])
    assert restarted.runner.model_hash == world["good"]  # the store's pointer already switched
    assert restarted.machine.state is S.PROBATION
    assert restarted.machine.run(None) is S.COMMITTED  # no network needed to finish
    assert restarted.chain == ["probation", "committed"]


def test_killed_after_rollback_switch_finishes_the_rollback(world, monkeypatch):
    agent = _agent_on(world, world["good"])
    real_activate = agent.store.activate

    def activate_then_die(h):
        real_activate(h)
        raise Killed()

    monkeypatch.setattr(agent.store, "activate", activate_then_die)
    with pytest.raises(Killed):
        _update(agent, world["bad"])
    restarted = boot(world["root"], world["server"], world["local"])
    assert restarted.machine.run(None) is S.ROLLED_BACK
    assert restarted.runner.model_hash == world["good"]
    assert restarted.machine.rejected(world["bad"]) is not None


def test_a_state_that_keeps_killing_the_agent_is_left(world, monkeypatch):
    """Dying in probation at every start-up (a model that crashes the process): after
    max_resumes restarts the new model is rolled back instead of judged again."""
    agent = _agent_on(world, world["bad"])
    monkeypatch.setitem(update_machine._HANDLERS, S.PROBATION, lambda m, w: (_ for _ in ()).throw(Killed()))
    with pytest.raises(Killed):
        _update(agent, world["good"])
    for _ in range(2):  # max_resumes=2: two more deaths in probation
        restarted = boot(world["root"], world["server"], world["local"], max_resumes=2)
        with pytest.raises(Killed):
            restarted.machine.run(None)
    monkeypatch.undo()
    last = boot(world["root"], world["server"], world["local"], max_resumes=2)
    assert last.machine.state is S.ROLLING_BACK
    assert last.machine.run(None) is S.ROLLED_BACK
    assert "state loop" in last.machine.rejected(world["good"]).reason
    assert last.runner.model_hash == world["bad"]


def test_status_names_state_hashes_reason_and_rollbacks(world):
    agent = _agent_on(world, world["good"])
    _update(agent, world["bad"])
    st = agent.machine.status()
    assert st["state"] == "rolled_back" and st["target_hash"] == world["bad"]
    assert st["previous_hash"] == world["good"] and "below" in st["reason"]
    assert st["rollbacks"][0]["model_hash"] == world["bad"] and st["probation"]["samples"] == 200
    assert np.isfinite(st["probation"]["new_accuracy"])


def test_a_crash_loop_before_the_switch_fails_the_update(world, monkeypatch):
    """Dying while verifying (decoding OOM-kills the agent, say) at every try: progress in
    between (the download completes again) does not hide the loop; the old model stays."""
    monkeypatch.setitem(update_machine._HANDLERS, S.VERIFYING, lambda m, w: (_ for _ in ()).throw(Killed()))
    agent = _agent_on(world, world["bad"])
    with pytest.raises(Killed):
        _update(agent, world["good"])
    for _ in range(2):
        restarted = boot(world["root"], world["server"], world["local"], max_resumes=2)
        with pytest.raises(Killed):
            restarted.machine.run(world["good"])
    last = boot(world["root"], world["server"], world["local"], max_resumes=2)
    assert last.machine.state is S.FAILED and "state loop" in last.machine.record.reason
    assert last.runner.model_hash == world["bad"] and last.machine.rejected(world["good"]) is None
    assert not any((world["root"] / "downloads").iterdir())  # nothing left to resume into


def test_a_stored_target_that_did_not_load_at_start_up_is_installed_again(world):
    """The store points at the target but the runner could not load it when the agent
    started: the update starts from the store's previous model, not from the target."""
    agent = _agent_on(world, world["bad"])
    _install(world, agent, world["good"])  # store: good (previous: bad)
    fresh = boot(world["root"], world["server"], world["local"], runner=FailingLoadRunner(world["good"]))
    assert not fresh.runner.ready
    assert _update(fresh, world["good"]) is S.ROLLED_BACK  # it still does not load here
    assert fresh.machine.record.previous_hash == world["bad"]
    assert fresh.store.current_hash() == fresh.runner.model_hash == world["bad"]


# --- the updater service: a target named mid-update is not lost ---------------------------------


@pytest.fixture
def updater_service(world):
    """``updater_service(agent, retry=Backoff)``: the updater service driving ``agent``'s
    machine, with a registered :class:`Connection` whose target the test sets (the server's
    word)."""
    from edge_agent.backoff import Backoff
    from edge_agent.client import FleetClient
    from edge_agent.connection import Connection
    from edge_agent.identity import Identity, save_identity
    from edge_agent.services.updater_service import UpdaterService
    from edge_agent.settings import AgentSettings

    settings = AgentSettings(server="127.0.0.1:9", data_dir=world["root"], status_port=-1)
    save_identity(world["root"], Identity("dev-1", "cred", settings.server))
    conn = Connection(settings, FleetClient(settings.server))  # never dialled: the machine
    # downloads from the ArtefactServer

    def make(agent: Agent, retry: Backoff | None = None) -> UpdaterService:
        return UpdaterService(conn, agent.machine, lambda: agent.runner.model_hash,
                              retry=retry or Backoff(jitter="none"),
                              link_backoff=Backoff(jitter="none"))

    yield make
    conn.client.close()


@pytest.mark.parametrize("scenario", ["committed", "rolled_back"])
def test_a_target_named_during_probation_is_installed_after_the_verdict(world, monkeypatch,
                                                                         updater_service, scenario):
    """The server names a third version while the agent judges the second: the verdict
    stands, then the third is installed from the model serving after it (the old one after a
    rollback), with no new word from the server needed."""
    good, bad = world["good"], world["bad"]
    old, target = (bad, good) if scenario == "committed" else (good, bad)
    agent = _agent_on(world, old)
    third = world["server"].publish(agent.runner.arch,
                                    {k: v * 1.001 for k, v in world["states"][good].items()})
    service = updater_service(agent)
    conn = service.conn
    real = update_machine._HANDLERS[S.PROBATION]

    def judge_while_the_server_moves_on(m, wanted):
        conn.set_target(third)
        return real(m, wanted)

    monkeypatch.setitem(update_machine._HANDLERS, S.PROBATION, judge_while_the_server_moves_on)
    conn.set_target(target)
    conn.target_changed.clear()
    assert service.tick() is State(scenario)
    serving = agent.runner.model_hash
    assert serving == (target if scenario == "committed" else old)
    assert conn.target_changed.is_set() and conn.target == third  # wakes the service at once
    monkeypatch.undo()
    assert service.tick() is S.COMMITTED
    assert agent.runner.model_hash == agent.store.current_hash() == third
    assert agent.machine.record.previous_hash == serving  # a rollback would restore it


def test_a_new_target_does_not_wait_out_the_backoff_of_a_failed_one(world, updater_service):
    from edge_agent.backoff import Backoff

    agent = _agent_on(world, world["bad"])
    service = updater_service(agent, retry=Backoff(3600, 3600, jitter="none"))
    service.conn.set_target("d" * 64)  # the server names a version it cannot serve
    assert service.tick() is S.FAILED
    assert service.tick() is S.FAILED and len(world["server"].requests) == 1  # backing off
    service.conn.set_target(world["good"])
    assert service.tick() is S.COMMITTED and agent.runner.model_hash == world["good"]


def test_a_version_rolled_back_under_its_v1_hash_is_still_never_retried(world):
    """Upgrade from the v1 model hash: the rejected model's file was collected, so the store
    could not re-key it and the record keeps its v1 name; the migrated server names it by v2."""
    from edge_agent.update_state import RollbackReport
    from shared.tensors import tensors_hash

    agent = _agent_on(world, world["good"])
    v1 = tensors_hash(world["states"][world["bad"]])
    agent.machine._save(agent.machine.record.with_rollback(RollbackReport(v1, "worse (v1 era)", 1)))
    agent.machine.start(world["bad"])  # not recognised by name
    assert agent.machine.run(world["bad"]) is S.FAILED
    assert agent.chain[-3:] == ["downloading", "verifying", "failed"]
    assert agent.store.current_hash() == agent.runner.model_hash == world["good"]  # nothing installed
    assert agent.machine.rejected(world["bad"]).reason == "worse (v1 era)"  # the v2 name now
    with pytest.raises(UpdateStateError, match="not retried"):
        agent.machine.start(world["bad"])
    again = boot(world["root"], world["server"], world["local"])
    assert again.machine.rejected(world["bad"]) is not None and again.machine.rejected(v1) is None
