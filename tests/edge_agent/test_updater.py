"""The agent's updater against a real gRPC server on a loopback port: install, resume an
interrupted download, and refuse a corrupt artefact while the old model keeps running."""

from __future__ import annotations

import hashlib
import json
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from sqlalchemy import select

from edge_agent.client import CredentialRejected, FleetClient, PermanentError, TransientError
from edge_agent.model_store import ModelStore
from edge_agent.runner import ModelRunner
from edge_agent.updater import UpdateFailed, Updater
from edge_agent.upload_queue import QueuedSample
from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.db.engine import transaction
from server.db.models import Device, Sample
from server.domain.versions import get_version, publish_version
from server.grpc_api.servicer import FleetServicer
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


class GrpcServer:
    def __init__(self, ctx) -> None:
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        pb_grpc.add_EdgeFleetServicer_to_server(
            FleetServicer(ctx.settings, ctx.factory, ctx.blobs, ctx.targets_changed), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0).wait(5)


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


@pytest.fixture
def server(server_ctx):
    srv = GrpcServer(server_ctx)
    yield srv
    srv.stop()


def _agent(address: str, agent_dir: Path, credential: str, cut_after: int | None = None, **kw):
    client = FlakyClient(address, cut_after)
    client.credential = credential
    store, runner = ModelStore(agent_dir / "models"), ModelRunner()
    current = store.current()
    if current is not None:  # what the daemon does at start-up
        runner.load(current.arch, current.state, current.model_hash)
    updater = Updater(client, store, runner, agent_dir, max_artefact_bytes=kw.pop("max_artefact_bytes", 1 << 26),
                      chunk_bytes=CHUNK)
    return client, store, runner, updater


def _register(address: str) -> tuple[str, str]:
    client = FleetClient(address, timeout_s=10)
    try:
        reg = client.register(enrollment_token=ServerSettings.model_fields["enrollment_token"].default,
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


def _leftovers(agent_dir: Path) -> list[str]:
    return sorted(p.name for p in (agent_dir / "downloads").iterdir())


def test_installs_the_full_model(server, server_ctx, tmp_path):
    cred, target = _register(server.address)
    client, store, runner, updater = _agent(server.address, tmp_path / "agent", cred)
    try:
        assert not runner.ready and store.current() is None
        updater.update_to(target)
        assert runner.model_hash == target and store.current_hash() == target
        assert store.current().model_hash == target  # re-verified from disk
        assert updater.stats.bytes_downloaded == _artefact_size(server_ctx, target)
        assert updater.stats.artefacts_installed == 1 and updater.stats.failures == 0
        assert _leftovers(tmp_path / "agent") == [] and not updater.state_file.exists()
        x = np.zeros((2, 1, 28, 28), np.uint8)
        pred, conf = runner.predict(x)
        assert pred.shape == (2,) and (conf > 0).all()
        # Already there: no second download.
        updater.update_to(target)
        assert updater.stats.artefacts_installed == 1 and len(client.requests) == 1
    finally:
        client.close()


def test_interrupted_download_resumes_after_agent_and_server_restart(server, server_ctx, tmp_path):
    cred, target = _register(server.address)
    size = _artefact_size(server_ctx, target)
    assert size > 20 * CHUNK
    agent_dir = tmp_path / "agent"
    client, store, runner, updater = _agent(server.address, agent_dir, cred, cut_after=12)
    with pytest.raises(TransientError):
        updater.update_to(target)
    client.close()
    assert not runner.ready and store.current_hash() is None  # nothing half-installed
    part = agent_dir / "downloads" / f"{json.loads(updater.state_file.read_text())['artefact_sha256']}.part"
    assert part.stat().st_size == 12 * CHUNK

    # The server restarts (new port) and the agent restarts (new objects, same data dir).
    server.stop()
    server2 = GrpcServer(server_ctx)
    try:
        client2, store2, runner2, updater2 = _agent(server2.address, agent_dir, cred)
        updater2.update_to(target)
        sha, offset = client2.requests[0]
        assert offset == 12 * CHUNK and sha == part.name.removesuffix(".part")  # asked for the rest only
        assert updater2.stats.bytes_downloaded == size - 12 * CHUNK
        assert runner2.model_hash == target and store2.current_hash() == target
        assert _leftovers(agent_dir) == [] and not updater2.state_file.exists()
        client2.close()
    finally:
        server2.stop()


def test_several_interruptions_still_end_with_the_right_model(server, server_ctx, tmp_path):
    cred, target = _register(server.address)
    agent_dir = tmp_path / "agent"
    client, store, runner, updater = _agent(server.address, agent_dir, cred, cut_after=7)
    try:
        for _ in range(100):
            try:
                updater.update_to(target)
                break
            except TransientError:
                continue
        assert runner.model_hash == target and store.current_hash() == target
        offsets = [off for _, off in client.requests]
        assert offsets == [i * 7 * CHUNK for i in range(len(offsets))]  # each try continues the last
        assert updater.stats.bytes_downloaded == _artefact_size(server_ctx, target)
    finally:
        client.close()


def test_corrupt_artefact_is_refused_and_the_old_model_keeps_running(server, server_ctx, tmp_path):
    cred, v0 = _register(server.address)
    agent_dir = tmp_path / "agent"
    client, store, runner, updater = _agent(server.address, agent_dir, cred)
    try:
        updater.update_to(v0)
        x = np.random.default_rng(0).integers(0, 256, (8, 1, 28, 28), dtype=np.uint8)
        before = runner.predict(x)

        v1 = _publish_next(server_ctx, seed=1)
        with transaction(server_ctx.factory) as s:
            blob = server_ctx.blobs.path(get_version(s, v1).full_artefact_sha256)
        data = bytearray(blob.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit rots on the server's disk
        blob.write_bytes(bytes(data))
        assert hashlib.sha256(bytes(data)).hexdigest() != blob.name

        with pytest.raises(UpdateFailed, match="integrity"):
            updater.update_to(v1)
        assert runner.model_hash == v0 and store.current_hash() == v0
        assert store.current().model_hash == v0
        after = runner.predict(x)
        assert (before[0] == after[0]).all() and np.allclose(before[1], after[1])
        assert updater.stats.failures == 1 and updater.stats.artefacts_installed == 1
        assert _leftovers(agent_dir) == [] and not updater.state_file.exists()  # nothing to resume into

        # An agent restarted after the failure still runs the old model.
        client2, store2, runner2, _ = _agent(server.address, agent_dir, cred)
        assert runner2.model_hash == v0
        client2.close()
    finally:
        client.close()


def test_artefact_over_the_size_limit_is_refused(server, server_ctx, tmp_path):
    cred, target = _register(server.address)
    size = _artefact_size(server_ctx, target)
    client, store, runner, updater = _agent(server.address, tmp_path / "agent", cred, max_artefact_bytes=size - 1)
    try:
        with pytest.raises(UpdateFailed, match="max_artefact_bytes"):
            updater.update_to(target)
        assert not runner.ready and store.current_hash() is None
        assert updater.stats.bytes_downloaded == 0
    finally:
        client.close()


# --- the client's error classes, which decide retry vs give up --------------------------------


def test_client_upload_and_error_classification(server, server_ctx, tmp_path):

    cred, target = _register(server.address)
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
    cred, v0 = _register(server.address)
    client, store, runner, updater = _agent(server.address, tmp_path / "agent", cred)
    try:
        updater.update_to(v0)
        wider = ArchSpec("mlp", (1, 28, 28), 10, hidden=(17,))
        state = init_weights_from_seed(build_model(wider), 5).state_dict()
        with transaction(server_ctx.factory) as s:
            bad = publish_version(s, server_ctx.blobs, arch=ARCH, state=state, parent_hash=v0, method="full",
                                  metrics={}, fleet_default=True).model_hash
        with pytest.raises(UpdateFailed, match="architecture"):
            updater.update_to(bad)
        assert runner.model_hash == v0 and store.current_hash() == v0
        assert runner.predict(np.zeros((1, 1, 28, 28), np.uint8))[0].shape == (1,)
    finally:
        client.close()
