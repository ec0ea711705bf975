"""The agent API over a real gRPC server on a loopback port, backed by SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import time

import grpc
import numpy as np
import pytest
from sqlalchemy import func, select

from protos.edgeloop.v1 import fleet_pb2 as pb
from server.db.engine import transaction
from server.db.models import Delivery, Device, Round, Sample
from server.domain import rounds as R
from server.domain.versions import latest_version
from server.worker import RoundWorker
from shared.data import load_dataset
from tests.server.grpc_fleet import Fleet, md, pb_sample, stream


@pytest.fixture(scope="module")
def images():
    ds = load_dataset("fashion-mnist")
    return ds.x_test[:300], ds.y_test[:300]


def n_samples(ctx) -> int:
    with transaction(ctx.factory) as s:
        return s.scalar(select(func.count()).select_from(Sample))


def v0_hash(ctx) -> str:
    with transaction(ctx.factory) as s:
        return latest_version(s).model_hash


# --- Register / Heartbeat -------------------------------------------------------------------


def test_register_and_heartbeat(fleet):
    reg = fleet.register(name="cam", tags=["site-a"], hardware={"cpu": "x86"}, agent_version="0.1.0")
    assert len(reg.device_id) == 32 and len(reg.device_credential) >= 32
    assert reg.target_model_hash == v0_hash(fleet.ctx)
    assert reg.heartbeat_interval_s == fleet.settings.heartbeat_interval_s
    again = fleet.register()
    assert again.device_id == reg.device_id and again.device_credential != reg.device_credential

    budget = pb.Budget(latency_ms=12.5)
    hb = fleet.stub.Heartbeat(pb.HeartbeatRequest(
        model_hash=reg.target_model_hash, active_subnet=1, budget=budget, metrics={"accuracy": 0.8},
        state="idle", samples_pending=4), metadata=md(again.device_credential), timeout=10)
    assert hb.target_model_hash == reg.target_model_hash
    assert abs(hb.server_time_unix_ms - time.time() * 1000) < 60_000
    with transaction(fleet.ctx.factory) as s:
        dev = s.get(Device, reg.device_id)
        assert dev.model_hash == reg.target_model_hash and dev.active_subnet == 1
        assert dev.budget == {"latency_ms": 12.5}  # unset budget fields mean "no limit", not 0
        assert dev.metrics == {"accuracy": 0.8} and dev.samples_pending == 4


def test_invalid_arguments_map_to_invalid_argument(fleet):
    with pytest.raises(grpc.RpcError) as err:
        fleet.register(hardware_id="")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        fleet.register(tags=["Bad Tag"])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "tags" in err.value.details()
    cred = fleet.register().device_credential
    with pytest.raises(grpc.RpcError) as err:
        fleet.stub.Heartbeat(pb.HeartbeatRequest(model_hash="not-a-hash"), metadata=md(cred), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_heartbeat_rollback_reports_are_validated_and_stored(fleet):
    """Rollback reports come from an untrusted device: a bad one refuses the whole heartbeat
    (nothing of it is stored); good ones are kept once however often they are repeated."""
    reg = fleet.register()
    good = pb.UpdateReport(model_hash="ab" * 32, reason="accuracy 0.1 is below 0.9", at_ms=1_700_000_000_000)
    for _ in range(2):  # every heartbeat repeats the device's list
        fleet.stub.Heartbeat(pb.HeartbeatRequest(state="rolled_back", rollbacks=[good]),
                             metadata=md(reg.device_credential), timeout=10)
    bad_reports = [
        [pb.UpdateReport(model_hash="AB" * 32, at_ms=1)],  # not lowercase hex
        [pb.UpdateReport(model_hash="cd" * 32, reason="x" * 1025, at_ms=1)],
        [pb.UpdateReport(model_hash="cd" * 32, at_ms=-5)],
        [pb.UpdateReport(model_hash="cd" * 32, at_ms=i) for i in range(65)],
    ]
    for reports in bad_reports:
        with pytest.raises(grpc.RpcError) as err:
            fleet.stub.Heartbeat(pb.HeartbeatRequest(state="idle", rollbacks=reports),
                                 metadata=md(reg.device_credential), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rollback" in err.value.details()
    with transaction(fleet.ctx.factory) as s:
        dev = s.get(Device, reg.device_id)
        assert dev.state == dev.update_state == "rolled_back"  # the refused heartbeats changed nothing
        assert dev.rollbacks == [{"model_hash": "ab" * 32, "reason": "accuracy 0.1 is below 0.9",
                                  "at_ms": 1_700_000_000_000}]


# --- authentication -------------------------------------------------------------------------


def _calls(fleet: Fleet, metadata) -> dict:
    """Every credentialed RPC, fully consumed."""
    return {
        "Heartbeat": lambda: fleet.stub.Heartbeat(pb.HeartbeatRequest(), metadata=metadata, timeout=10),
        "UploadSamples": lambda: fleet.stub.UploadSamples(iter([pb.UploadSamplesRequest()]), metadata=metadata,
                                                          timeout=10),
        "GetUpdate": lambda: list(fleet.stub.GetUpdate(pb.GetUpdateRequest(), metadata=metadata, timeout=10)),
        "WatchUpdates": lambda: list(fleet.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=1),
                                                             metadata=metadata, timeout=10)),
    }


def test_unauthenticated_credentials_are_refused(fleet):
    reg = fleet.register()
    old = reg.device_credential
    fresh = fleet.register().device_credential  # re-registering revokes the old credential
    revoked_reg = fleet.register("hw-2")
    with transaction(fleet.ctx.factory) as s:
        s.get(Device, revoked_reg.device_id).revoked = True
    cases = {
        "missing": None,
        "empty": md(""),
        "not bearer": [("authorization", f"Basic {fresh}")],
        "unknown": md("x" * 43),
        "superseded": md(old),
        "revoked": md(revoked_reg.device_credential),
    }
    for case, metadata in cases.items():
        for name, call in _calls(fleet, metadata).items():
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, (case, name, err.value.details())
    # The fresh credential works for all of them.
    for call in _calls(fleet, md(fresh)).values():
        call()


def test_bad_enrollment_token_is_unauthenticated(fleet):
    for token in ("", "wrong-token-123"):
        with pytest.raises(grpc.RpcError) as err:
            fleet.register(token=token)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with transaction(fleet.ctx.factory) as s:
        assert s.scalar(select(func.count()).select_from(Device)) == 0


def test_revoked_device_watch_stream_is_cut(fleet):
    reg = fleet.register()
    calls = fleet.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=30), metadata=md(reg.device_credential),
                                    timeout=20)
    first = next(calls)
    assert first.target_model_hash == reg.target_model_hash and not first.keepalive
    with transaction(fleet.ctx.factory) as s:
        s.get(Device, reg.device_id).revoked = True
    with pytest.raises(grpc.RpcError) as err:
        for _ in calls:
            pass
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


# --- UploadSamples --------------------------------------------------------------------------


def test_upload_dedupes_and_reports_rejections(fleet, images):
    x, y = images
    cred = fleet.register().device_credential
    good = [pb_sample(x[i], int(y[i])) for i in range(20)]
    unlabelled = [pb_sample(x[i]) for i in range(20, 25)]
    resp = fleet.stub.UploadSamples(stream(good + unlabelled), metadata=md(cred), timeout=30)
    assert (resp.accepted, resp.duplicates, len(resp.rejected)) == (25, 0, 0)
    assert set(resp.committed_ids) == {s.sample_id for s in good + unlabelled}
    for s in good:
        assert fleet.ctx.blobs.get(s.sample_id) == s.payload  # durable before the answer

    # The ack was lost and the agent sends the same stream again: nothing is stored twice.
    again = fleet.stub.UploadSamples(stream(good + unlabelled), metadata=md(cred), timeout=30)
    assert (again.accepted, again.duplicates) == (0, 25) and set(again.committed_ids) == set(resp.committed_ids)
    assert n_samples(fleet.ctx) == 25

    wrong = pb_sample(np.zeros((1, 14, 14), np.uint8), 1)
    forged = pb_sample(x[30], 1)
    forged.sample_id = "0" * 64
    bad_label = pb_sample(x[31], 42)
    mixed = fleet.stub.UploadSamples(stream([wrong, forged, bad_label, pb_sample(x[32], 2)]), metadata=md(cred),
                                     timeout=30)
    assert mixed.accepted == 1 and len(mixed.committed_ids) == 1
    reasons = {r.sample_id: r.reason for r in mixed.rejected}
    assert "does not match the fleet model input" in reasons[wrong.sample_id]
    assert "SHA-256" in reasons["0" * 64]
    assert "label 42" in reasons[bad_label.sample_id]
    assert n_samples(fleet.ctx) == 26
    with transaction(fleet.ctx.factory) as s:
        labels = dict(s.execute(select(Sample.sample_id, Sample.label)).all())
    assert labels[good[0].sample_id] == int(y[0]) and labels[unlabelled[0].sample_id] is None


def test_oversized_upload_stream_is_refused_and_stores_nothing(fleet_factory, images):
    x, y = images
    fleet = fleet_factory(max_upload_bytes=1 << 16)  # 64 KiB; each sample is ~0.8 KiB
    cred = fleet.register().device_credential
    samples = [pb_sample(x[i], int(y[i])) for i in range(120)]  # ~96 KiB
    with pytest.raises(grpc.RpcError) as err:
        fleet.stub.UploadSamples(stream(samples), metadata=md(cred), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "exceeds" in err.value.details()
    assert n_samples(fleet.ctx) == 0
    assert not any(fleet.ctx.blobs.has(s.sample_id) for s in samples)
    # Split as the message asks, the same samples go through.
    for part in (samples[:60], samples[60:]):
        assert fleet.stub.UploadSamples(stream(part), metadata=md(cred), timeout=30).accepted == 60


def test_too_many_samples_in_one_stream_is_refused(fleet_factory, images):
    x, _ = images
    fleet = fleet_factory(max_samples_per_upload=10)
    cred = fleet.register().device_credential
    with pytest.raises(grpc.RpcError) as err:
        fleet.stub.UploadSamples(stream([pb_sample(x[i]) for i in range(11)], per_message=3), metadata=md(cred),
                                 timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "split" in err.value.details()
    assert n_samples(fleet.ctx) == 0


# --- GetUpdate ------------------------------------------------------------------------------


def _download(fleet: Fleet, cred: str, **req) -> tuple[pb.UpdateInfo, list[pb.Chunk]]:
    msgs = list(fleet.stub.GetUpdate(pb.GetUpdateRequest(**req), metadata=md(cred), timeout=60))
    assert msgs[0].HasField("info") and all(m.HasField("chunk") for m in msgs[1:])
    return msgs[0].info, [m.chunk for m in msgs[1:]]


def test_get_update_streams_the_full_model(fleet):
    reg = fleet.register()
    info, chunks = _download(fleet, reg.device_credential, max_chunk_bytes=64 << 10)
    assert info.target_model_hash == info.final_model_hash == reg.target_model_hash
    assert info.encoding == "model/safetensors-v1" and info.base_model_hash == "" and info.offset == 0
    pos = 0
    for c in chunks:
        assert c.offset == pos and 0 < len(c.data) <= 64 << 10
        pos += len(c.data)
    data = b"".join(c.data for c in chunks)
    assert len(data) == info.artefact_size
    assert hashlib.sha256(data).hexdigest() == info.artefact_sha256
    with transaction(fleet.ctx.factory) as s:
        row = s.scalars(select(Delivery).where(Delivery.device_id == reg.device_id)).one()
        assert row.bytes_sent == info.artefact_size and row.completed
        assert row.final_model_hash == reg.target_model_hash


def test_get_update_resumes_from_an_offset(fleet):
    cred = fleet.register().device_credential
    info, chunks = _download(fleet, cred)
    whole = b"".join(c.data for c in chunks)
    for offset in (1, 1000, info.artefact_size // 2, info.artefact_size - 1, info.artefact_size):
        rinfo, rchunks = _download(fleet, cred, artefact_sha256=info.artefact_sha256, offset=offset,
                                   max_chunk_bytes=100_000)
        assert rinfo.offset == offset and rinfo.artefact_sha256 == info.artefact_sha256
        rest = b"".join(c.data for c in rchunks)
        assert len(rest) == info.artefact_size - offset  # exactly the remaining bytes
        assert not rchunks or rchunks[0].offset == offset
        assert hashlib.sha256(whole[:offset] + rest).hexdigest() == info.artefact_sha256
    # Resuming an artefact that is no longer the plan restarts from byte 0.
    rinfo, rchunks = _download(fleet, cred, artefact_sha256="e" * 64, offset=500)
    assert rinfo.offset == 0 and b"".join(c.data for c in rchunks) == whole
    with pytest.raises(grpc.RpcError) as err:
        _download(fleet, cred, artefact_sha256=info.artefact_sha256, offset=info.artefact_size + 1)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        _download(fleet, cred, target_model_hash="f" * 64)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_tiny_chunk_requests_are_raised_to_the_floor(fleet):
    cred = fleet.register().device_credential
    info, chunks = _download(fleet, cred, max_chunk_bytes=1, offset=0)
    assert len(chunks[0].data) == min(1024, info.artefact_size)


# --- WatchUpdates ---------------------------------------------------------------------------


def test_watch_sends_current_target_then_keepalives_and_ends(fleet):
    reg = fleet.register()
    t0 = time.monotonic()
    msgs = list(fleet.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=2), metadata=md(reg.device_credential),
                                        timeout=20))
    assert time.monotonic() - t0 < 15  # the server ended the stream itself
    assert msgs[0].target_model_hash == reg.target_model_hash and not msgs[0].keepalive
    assert len(msgs) >= 2 and all(m.keepalive and m.target_model_hash == reg.target_model_hash for m in msgs[1:])


def test_watch_delivers_a_new_target_promptly_after_a_round(fleet_factory, images):
    x, y = images
    # Keepalives every 60 s: a message sooner than that can only come from the notification.
    fleet = fleet_factory(watch_keepalive_s=60.0)
    reg = fleet.register()
    cred = reg.device_credential
    fleet.stub.UploadSamples(stream([pb_sample(x[i], int(y[i])) for i in range(40)]), metadata=md(cred), timeout=30)
    watch = fleet.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=120), metadata=md(cred), timeout=30)
    first = next(watch)
    assert first.target_model_hash == reg.target_model_hash and not first.keepalive

    ctx = fleet.ctx
    with transaction(ctx.factory) as s:
        rid = R.create_round(s, method="full", cohort={"all": True},
                             params={"epochs": 1, "skip_if_worse": False, "min_labelled": 1}).id
    worker = RoundWorker(fleet.settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                         targets_changed=ctx.targets_changed)
    assert worker.run_next()
    published = time.monotonic()
    with transaction(ctx.factory) as s:
        rnd = s.get(Round, rid)
        assert rnd.status == R.DONE, rnd.reason
        new_hash = rnd.model_hash
    got = next(watch)  # the RPC deadline (30 s) is well under the keepalive (60 s)
    assert got.target_model_hash == new_hash != reg.target_model_hash and not got.keepalive
    assert time.monotonic() - published < 30
    watch.cancel()
    # Heartbeat and GetUpdate agree with the watch.
    hb = fleet.stub.Heartbeat(pb.HeartbeatRequest(), metadata=md(cred), timeout=10)
    assert hb.target_model_hash == new_hash
    info, _ = _download(fleet, cred)
    assert info.final_model_hash == new_hash


def test_many_concurrent_watchers_all_hear_the_change(fleet):
    creds = [fleet.register(f"hw-{i}").device_credential for i in range(5)]
    streams = [fleet.stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=30), metadata=md(c), timeout=20)
               for c in creds]
    firsts = [next(s) for s in streams]
    assert len({f.target_model_hash for f in firsts}) == 1
    new_target = "c" * 64
    with transaction(fleet.ctx.factory) as s:
        for d in s.scalars(select(Device)):
            d.target_model_hash = new_target
    fleet.ctx.targets_changed.notify()
    results: list[str] = []

    def drain(st) -> None:
        for m in st:
            if not m.keepalive:
                results.append(m.target_model_hash)
                st.cancel()
                return

    threads = [threading.Thread(target=drain, args=(s,)) for s in streams]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert results == [new_target] * 5
