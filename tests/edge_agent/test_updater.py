"""The agent's update path (updater + update machine) against a real gRPC server on a loopback
port: install, resume an interrupted download, refuse a corrupt artefact while the old model
keeps running, and roll back a published version that is worse on the device's own labels."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import select

from edge_agent.client import CredentialRejected, FleetClient, PermanentError, TransientError
from edge_agent.disk_budget import DataDirBudget
from edge_agent.local_data import LocalDataset
from edge_agent.model_store import ModelStore
from edge_agent.probation import ProbationConfig
from edge_agent.runner import ModelRunner
from edge_agent.trust import TrustStore
from edge_agent.update_machine import UpdateContext, UpdateMachine
from edge_agent.update_state import State, UpdateStateFile
from edge_agent.updater import Updater
from edge_agent.upload_queue import QueuedSample
from protos.edgeloop.v1 import fleet_pb2 as pb
from server.db.engine import transaction
from server.db.models import Device, Sample
from server.domain.versions import get_version, publish_version
from server.settings import ServerSettings
from shared.models import ArchSpec, build_model, init_weights_from_seed
from shared.samples import encode_sample

# Small enough to keep the test fast, big enough (~51 KB) to need many 1 KiB chunks.
ARCH = ArchSpec("mlp", (1, 28, 28), 10, hidden=(16,))
CHUNK = 1024


@pytest.fixture
def server_settings(tmp_path):
    """Overrides tests/conftest.py: the updater is agent code, one database kind is enough."""
    return ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'server.db'}",
                          model_arch_json=ARCH.to_json(), heartbeat_interval_s=0.5, watch_keepalive_s=0.5,
                          fsync=False)


class FlakyClient(FleetClient):
    """A real client whose link drops after ``cut_after`` chunks of a download, the way a
    broken connection surfaces (``classify`` turns UNAVAILABLE into TransientError)."""

    def __init__(self, address: str, cut_after: int | None = None) -> None:
        super().__init__(address, timeout_s=10)
        self.cut_after = cut_after
        self.requests: list[tuple[str, int]] = []

    def get_update(self, req, timeout_s=None):
        self.requests.append((req.artefact_sha256, req.offset))
        chunks = 0
        for msg in super().get_update(req, timeout_s):
            if msg.HasField("chunk"):
                if self.cut_after is not None and chunks >= self.cut_after:
                    raise TransientError("UNAVAILABLE: link dropped mid-download")
                chunks += 1
            yield msg


class Agent:
    """The update path of one agent, as the daemon wires it."""

    def __init__(self, server, agent_dir: Path, credential: str, cut_after: int | None = None,
                 max_artefact_bytes: int = 1 << 26, client_cls: type[FlakyClient] = FlakyClient,
                 budget: DataDirBudget | None = None) -> None:
        self.client = client_cls(server.address, cut_after)
        self.trust = TrustStore(agent_dir)
        self.trust.pin_at_enrollment(server.signing_keys)  # as Register's answer does
        self.client.credential = credential
        self.store, self.runner = ModelStore(agent_dir / "models"), ModelRunner()
        current = self.store.current()
        if current is not None:  # what the daemon does at start-up
            self.runner.load(current.arch, current.state, current.model_hash)
        self.updater = Updater(self.client, agent_dir, max_artefact_bytes=max_artefact_bytes, chunk_bytes=CHUNK,
                               trust=self.trust, budget=budget)
        self.local = LocalDataset(agent_dir / "local_data.db")
        self.machine = UpdateMachine(
            UpdateContext(self.updater, self.store, self.runner, self.local, ProbationConfig()),
            UpdateStateFile(agent_dir / "update_state.json"))

    def update_to(self, target: str) -> State:
        """What the updater service does when the server names ``target``."""
        if self.machine.state is not State.DOWNLOADING:
            self.machine.start(target)
        return self.machine.run(target)

    def close(self) -> None:
        self.client.close()
        self.local.close()


def _register(server) -> tuple[str, str]:
    client = FleetClient(server.address, timeout_s=10)
    try:
        reg = client.register(enrollment_token=server.enrollment_token,
                              hardware_id="hw-updater", name="cam", tags=[], agent_version="test")
    finally:
        client.close()
    return reg.device_credential, reg.target_model_hash


def _publish_next(ctx, seed: int) -> str:
    """A new version for every device, as a finished round would leave it."""
    state = init_weights_from_seed(build_model(ARCH), seed).state_dict()
    with transaction(ctx.factory) as s:
        mv = publish_version(s, ctx.blobs, arch=ARCH, state=state, parent_hash=None, method="full", metrics={},
                             fleet_default=True)
        for dev in s.scalars(select(Device)):
            dev.target_model_hash = mv.model_hash
        return mv.model_hash


def _artefact_size(ctx, model_hash: str) -> int:
    with transaction(ctx.factory) as s:
        return ctx.blobs.size(get_version(s, model_hash).full_artefact_sha256)


def _artefact(ctx, model_hash: str) -> tuple[str, bytes]:
    """The full artefact the server ships for ``model_hash``: its SHA-256 and bytes."""
    with transaction(ctx.factory) as s:
        sha = get_version(s, model_hash).full_artefact_sha256
    return sha, ctx.blobs.path(sha).read_bytes()


def _leftovers(agent_dir: Path) -> list[str]:
    return sorted(p.name for p in (agent_dir / "downloads").iterdir())


def test_installs_the_full_model(server, server_ctx, tmp_path):
    cred, target = _register(server)
    dev = Agent(server, tmp_path / "agent", cred)
    try:
        assert not dev.runner.ready and dev.store.current() is None
        assert dev.update_to(target) is State.COMMITTED
        assert "not enough local labels" in dev.machine.record.reason
        assert dev.runner.model_hash == target and dev.store.current_hash() == target
        assert dev.store.current().model_hash == target  # re-verified from disk
        assert dev.updater.stats.bytes_downloaded == _artefact_size(server_ctx, target)
        assert dev.updater.stats.artefacts_installed == 1 and dev.updater.stats.failures == 0
        assert _leftovers(tmp_path / "agent") == [] and not dev.updater.state_file.exists()
        x = np.zeros((2, 1, 28, 28), np.uint8)
        pred, conf = dev.runner.predict(x)
        assert pred.shape == (2,) and (conf > 0).all()
    finally:
        dev.close()


def test_interrupted_download_resumes_after_agent_and_server_restart(
    server, server_ctx, tmp_path, start_grpc_server
):
    cred, target = _register(server)
    size = _artefact_size(server_ctx, target)
    assert size > 20 * CHUNK
    agent_dir = tmp_path / "agent"
    dev = Agent(server, agent_dir, cred, cut_after=12)
    assert dev.update_to(target) is State.DOWNLOADING  # suspended: the link dropped
    assert "interrupted" in dev.machine.record.reason
    dev.close()
    assert not dev.runner.ready and dev.store.current_hash() is None  # nothing half-installed
    part = agent_dir / "downloads" / f"{json.loads(dev.updater.state_file.read_text())['artefact_sha256']}.part"
    assert part.stat().st_size == 12 * CHUNK

    # The server restarts (new port) and the agent restarts (new objects, same data dir).
    server.stop()
    server2 = start_grpc_server()
    dev2 = Agent(server2, agent_dir, cred)
    assert dev2.machine.state is State.DOWNLOADING  # resumed from update_state.json
    assert dev2.update_to(target) is State.COMMITTED
    sha, offset = dev2.client.requests[0]
    assert offset == 12 * CHUNK and sha == part.name.removesuffix(".part")  # asked for the rest only
    assert dev2.updater.stats.bytes_downloaded == size - 12 * CHUNK
    assert dev2.runner.model_hash == target and dev2.store.current_hash() == target
    assert _leftovers(agent_dir) == [] and not dev2.updater.state_file.exists()
    dev2.close()


def test_several_interruptions_still_end_with_the_right_model(server, server_ctx, tmp_path):
    cred, target = _register(server)
    dev = Agent(server, tmp_path / "agent", cred, cut_after=7)
    try:
        for _ in range(100):
            if dev.update_to(target) is not State.DOWNLOADING:
                break
        assert dev.machine.state is State.COMMITTED
        assert dev.runner.model_hash == target and dev.store.current_hash() == target
        offsets = [off for _, off in dev.client.requests]
        assert offsets == [i * 7 * CHUNK for i in range(len(offsets))]  # each try continues the last
        assert dev.updater.stats.bytes_downloaded == _artefact_size(server_ctx, target)
    finally:
        dev.close()


def test_corrupt_artefact_is_refused_and_the_old_model_keeps_running(server, server_ctx, tmp_path):
    cred, v0 = _register(server)
    agent_dir = tmp_path / "agent"
    dev = Agent(server, agent_dir, cred)
    try:
        dev.update_to(v0)
        x = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
        before = dev.runner.predict(x)

        v1 = _publish_next(server_ctx, seed=1)
        with transaction(server_ctx.factory) as s:
            blob = server_ctx.blobs.path(get_version(s, v1).full_artefact_sha256)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit rots on the server's disk
        blob.write_bytes(bytes(data))
        assert hashlib.sha256(bytes(data)).hexdigest() != blob.name

        assert dev.update_to(v1) is State.FAILED
        assert "integrity" in dev.machine.record.reason
        assert dev.machine.rejected(v1) is None  # not a rollback: retried once the server is fixed
        assert dev.runner.model_hash == v0 and dev.store.current_hash() == v0
        assert dev.store.current().model_hash == v0
        after = dev.runner.predict(x)
        assert (before[0] == after[0]).all() and np.allclose(before[1], after[1])
        assert dev.updater.stats.failures == 1 and dev.updater.stats.artefacts_installed == 1
        assert _leftovers(agent_dir) == [] and not dev.updater.state_file.exists()  # nothing to resume into

        # An agent restarted after the failure still runs the old model.
        dev.close()
        dev2 = Agent(server, agent_dir, cred)
        assert dev2.runner.model_hash == v0 and dev2.machine.state is State.FAILED
        dev2.close()
    finally:
        dev.close()


def test_artefact_over_the_size_limit_is_refused(server, server_ctx, tmp_path):
    cred, target = _register(server)
    size = _artefact_size(server_ctx, target)
    dev = Agent(server, tmp_path / "agent", cred, max_artefact_bytes=size - 1)
    try:
        assert dev.update_to(target) is State.FAILED
        assert "max_artefact_bytes" in dev.machine.record.reason
        assert not dev.runner.ready and dev.store.current_hash() is None
        assert dev.updater.stats.bytes_downloaded == 0
    finally:
        dev.close()


def test_a_worse_version_is_rolled_back_and_the_server_records_it(server, server_ctx, tmp_path):
    """v0 labels the device's inputs perfectly (they are its own predictions); a published
    random v1 agrees with them by chance only, so probation rolls it back, and the heartbeat
    that reports it lands in the device's row."""
    cred, v0 = _register(server)
    dev = Agent(server, tmp_path / "agent", cred)
    try:
        dev.update_to(v0)
        x = np.random.default_rng(1).integers(0, 256, (64, 1, 28, 28), dtype=np.uint8)
        labels, _ = dev.runner.predict(x)
        for xi, yi in zip(x, labels, strict=True):
            dev.local.add(xi, int(yi))
        v1 = _publish_next(server_ctx, seed=7)
        assert dev.update_to(v1) is State.ROLLED_BACK
        assert dev.runner.model_hash == v0 and dev.store.current_hash() == v0
        report = dev.machine.rejected(v1)
        assert dev.machine.record.probation.old_accuracy == 1.0 and "below" in report.reason

        dev.client.heartbeat(pb.HeartbeatRequest(
            model_hash=v0, state=dev.machine.state.value,
            rollbacks=[pb.UpdateReport(model_hash=r.model_hash, reason=r.reason, at_ms=r.at_ms)
                       for r in dev.machine.record.rollbacks]))
        with transaction(server_ctx.factory) as s:
            row = s.scalars(select(Device)).one()
            assert row.update_state == "rolled_back" and row.model_hash == v0
            assert row.rollbacks == [{"model_hash": v1, "reason": report.reason, "at_ms": report.at_ms}]
    finally:
        dev.close()


# --- the client's error classes, which decide retry vs give up --------------------------------


def test_client_upload_and_error_classification(server, server_ctx, tmp_path):

    cred, target = _register(server)
    client = FleetClient(server.address, timeout_s=5)
    try:
        with pytest.raises(CredentialRejected):
            client.register(enrollment_token="wrong-token", hardware_id="hw", name="", tags=[], agent_version="")
        client.credential = "not-a-credential"
        with pytest.raises(CredentialRejected):
            client.heartbeat(pb.HeartbeatRequest())
        client.credential = cred
        rng = np.random.default_rng(0)
        samples = [QueuedSample.from_payload(encode_sample(rng.integers(0, 256, (1, 28, 28), dtype=np.uint8)),
                                             label=lab, captured_at=1.7e9) for lab in (None, 3, None)]
        resp = client.upload(samples, per_message=2)
        assert resp.accepted == 3 and set(resp.committed_ids) == {s.sample_id for s in samples}
        with transaction(server_ctx.factory) as s:
            labels = dict(s.execute(select(Sample.sample_id, Sample.label)).all())
        assert [labels[q.sample_id] for q in samples] == [None, 3, None]  # absent stays absent
        with pytest.raises(PermanentError) as err:  # NOT_FOUND: retrying will not help
            list(client.get_update(pb.GetUpdateRequest(target_model_hash="f" * 64)))
        assert not isinstance(err.value, TransientError) and err.value.code == grpc.StatusCode.NOT_FOUND
        assert client.heartbeat(pb.HeartbeatRequest()).target_model_hash == target
    finally:
        client.close()
    server.stop()
    down = FleetClient(server.address, timeout_s=2)
    down.credential = cred
    try:
        with pytest.raises(TransientError):  # server gone: retry with backoff
            down.heartbeat(pb.HeartbeatRequest())
    finally:
        down.close()


def test_model_that_does_not_fit_its_architecture_is_refused(server, server_ctx, tmp_path):
    """A published artefact whose tensors are not those of the spec it names (a server bug):
    the hash checks pass, so the decoder's shape check is what keeps the old model running."""
    cred, v0 = _register(server)
    dev = Agent(server, tmp_path / "agent", cred)
    try:
        dev.update_to(v0)
        wider = ArchSpec("mlp", (1, 28, 28), 10, hidden=(17,))
        state = init_weights_from_seed(build_model(wider), 5).state_dict()
        with transaction(server_ctx.factory) as s:
            bad = publish_version(s, server_ctx.blobs, arch=ARCH, state=state, parent_hash=v0, method="full",
                                  metrics={}, fleet_default=True).model_hash
        assert dev.update_to(bad) is State.FAILED
        assert "architecture" in dev.machine.record.reason
        assert dev.runner.model_hash == v0 and dev.store.current_hash() == v0
        assert dev.runner.predict(np.zeros((1, 1, 28, 28), np.uint8))[0].shape == (1,)
    finally:
        dev.close()


def test_an_artefact_whose_architecture_was_edited_is_refused(server, server_ctx, tmp_path):
    """Issue 8 fault 1: the server ships a version whose artefact has ``edgeloop.arch`` edited
    (input_shape [1,28,28] -> [784], which builds the same tensors), tensors and claimed hash
    unchanged, stored and signed like any artefact. The v2 model hash covers the architecture,
    so the agent refuses it and keeps running (and feeding) its model; before v2 it installed
    it and dropped every input."""
    from server.domain.versions import add_artefact
    from shared.artefacts import FULL_MODEL_ENCODING

    cred, v0 = _register(server)
    dev = Agent(server, tmp_path / "agent", cred)
    try:
        dev.update_to(v0)
        v1 = _publish_next(server_ctx, seed=6)
        _, data = _artefact(server_ctx, v1)
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + n])
        header["__metadata__"]["edgeloop.arch"] = ArchSpec("mlp", (784,), 10, hidden=(16,)).to_json()
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        edited = len(text).to_bytes(8, "little") + text + data[8 + n :]
        with transaction(server_ctx.factory) as s:
            art = add_artefact(s, server_ctx.blobs, edited, encoding=FULL_MODEL_ENCODING, target_hash=v1)
            get_version(s, v1).full_artefact_sha256 = art.sha256
        assert dev.update_to(v1) is State.FAILED
        assert "model hash mismatch" in dev.machine.record.reason
        assert dev.runner.model_hash == v0 and dev.store.current_hash() == v0 and dev.runner.arch == ARCH
        assert dev.runner.predict(np.zeros((1, 1, 28, 28), np.uint8))[0].shape == (1,)
    finally:
        dev.close()


# --- the server restarts the stream: what the part file holds must go --------------------------


class RestartingClient(FlakyClient):
    """A link through a proxy that does not resume: the request reaches the server without its
    ``artefact_sha256`` and ``offset``, so the same artefact comes back from byte 0."""

    def get_update(self, req, timeout_s=None):
        fresh = pb.GetUpdateRequest()
        fresh.CopyFrom(req)
        fresh.ClearField("artefact_sha256")
        fresh.offset = 0
        self.requests.append((req.artefact_sha256, req.offset))
        yield from FleetClient.get_update(self, fresh, timeout_s)


def test_a_stale_part_of_the_artefact_sent_from_byte_0_is_discarded(server, server_ctx, tmp_path):
    """The device resumes artefact X towards the target; the server now prefers artefact A
    and sends it from byte 0, while a stale 32 KiB ``<A>.part`` lies in downloads/ (left by an
    earlier attempt). The part must not be continued: before, every try failed with "chunk at
    offset 0, expected 32768" and cost a backoff."""
    cred, v0 = _register(server)
    target = _publish_next(server_ctx, seed=3)
    other_sha, other = _artefact(server_ctx, v0)
    sha, data = _artefact(server_ctx, target)
    assert len(data) > 32 * CHUNK
    agent_dir = tmp_path / "agent"
    dev = Agent(server, agent_dir, cred)
    try:
        downloads = agent_dir / "downloads"
        (downloads / f"{other_sha}.part").write_bytes(other[:5 * CHUNK])
        dev.updater._save(pb.UpdateInfo(artefact_sha256=other_sha, artefact_size=len(other),
                                        final_model_hash=target))
        (downloads / f"{sha}.part").write_bytes(b"\0" * 32 * CHUNK)
        assert dev.update_to(target) is State.COMMITTED, dev.machine.record.reason
        assert dev.client.requests == [(other_sha, 5 * CHUNK)]  # one try, resuming what it held
        assert dev.updater.stats.bytes_downloaded == len(data) and dev.updater.stats.failures == 0
        assert dev.store.current_hash() == dev.runner.model_hash == target
        assert _leftovers(agent_dir) == [] and not dev.updater.state_file.exists()
    finally:
        dev.close()


def test_the_same_artefact_restarted_from_byte_0_is_downloaded_afresh(server, server_ctx, tmp_path):
    cred, target = _register(server)
    size = _artefact_size(server_ctx, target)
    agent_dir = tmp_path / "agent"
    dev = Agent(server, agent_dir, cred, cut_after=32)
    assert dev.update_to(target) is State.DOWNLOADING  # 32 KiB held
    dev.close()
    dev2 = Agent(server, agent_dir, cred, client_cls=RestartingClient)
    try:
        assert dev2.update_to(target) is State.COMMITTED, dev2.machine.record.reason
        sha, offset = dev2.client.requests[0]
        assert offset == 32 * CHUNK  # it asked to resume; the answer started over
        assert dev2.updater.stats.bytes_downloaded == size and dev2.updater.stats.failures == 0
        assert dev2.store.current().model_hash == target
        assert _leftovers(agent_dir) == []
    finally:
        dev2.close()


def test_a_resume_at_an_offset_not_held_is_refused_and_discarded(server, server_ctx, tmp_path):
    """A server answering at a non-zero offset other than ours cannot be continued: refused
    (a server bug), and the part goes so the retry starts clean."""

    class SkewedClient(FlakyClient):
        def get_update(self, req, timeout_s=None):
            for msg in FleetClient.get_update(self, req, timeout_s):
                if msg.HasField("info") and msg.info.offset:
                    msg.info.offset += CHUNK
                yield msg

    cred, target = _register(server)
    agent_dir = tmp_path / "agent"
    dev = Agent(server, agent_dir, cred, cut_after=8)
    assert dev.update_to(target) is State.DOWNLOADING
    dev.close()
    dev2 = Agent(server, agent_dir, cred, client_cls=SkewedClient)
    try:
        assert dev2.update_to(target) is State.FAILED
        assert "we held 8192" in dev2.machine.record.reason
        assert _leftovers(agent_dir) == [] and not dev2.updater.state_file.exists()
    finally:
        dev2.close()
