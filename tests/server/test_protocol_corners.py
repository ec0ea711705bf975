"""The agent protocol's corner cases, as decided in docs/protocol.md, over real gRPC on loopback."""

from __future__ import annotations

import hashlib

import grpc
import pytest
from sqlalchemy import func, select

from protos.edgeloop.v1 import fleet_pb2 as pb
from server.db.engine import transaction
from server.db.models import Delivery, Sample
from server.grpc_api.servicer import MAX_CHUNK_BYTES, MIN_CHUNK_BYTES, chunk_size
from shared.data import load_dataset
from tests.server.grpc_fleet import Fleet, md, pb_sample, stream


@pytest.fixture(scope="module")
def images():
    return load_dataset("fashion-mnist").x_test[:4]


def _get(fleet: Fleet, cred: str, **req) -> list[pb.GetUpdateResponse]:
    return list(fleet.stub.GetUpdate(pb.GetUpdateRequest(**req), metadata=md(cred), timeout=60))


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code()


def _deliveries(fleet: Fleet) -> int:
    with transaction(fleet.ctx.factory) as s:
        return s.scalar(select(func.count()).select_from(Delivery))


# --- GetUpdate --------------------------------------------------------------------------------


def test_get_update_when_up_to_date_sends_no_artefact(fleet):
    reg = fleet.register()
    target = reg.target_model_hash
    msgs = _get(fleet, reg.device_credential, have_model_hash=target)
    assert len(msgs) == 1 and msgs[0].HasField("info")  # no chunks: the model is not resent
    info = msgs[0].info
    assert info.final_model_hash == info.target_model_hash == target
    assert info.artefact_sha256 == "" and info.artefact_size == 0 and info.encoding == ""
    assert _deliveries(fleet) == 0
    # Naming the target explicitly, or a resume of an artefact, changes nothing.
    again = _get(fleet, reg.device_credential, target_model_hash=target, have_model_hash=target,
                 artefact_sha256="a" * 64, offset=10)
    assert len(again) == 1 and again[0].info.artefact_sha256 == "" and again[0].info.offset == 0


def test_unknown_have_hash_gets_the_full_model(fleet):
    reg = fleet.register()
    cred = reg.device_credential
    full = _get(fleet, cred)
    unknown = _get(fleet, cred, have_model_hash="ab" * 32)
    assert unknown[0].info == full[0].info
    assert unknown[0].info.encoding == "model/safetensors-v1" and unknown[0].info.base_model_hash == ""
    data = b"".join(m.chunk.data for m in unknown[1:])
    assert hashlib.sha256(data).hexdigest() == unknown[0].info.artefact_sha256


def test_offset_without_artefact_is_invalid(fleet):
    cred = fleet.register().device_credential
    assert _code(lambda: _get(fleet, cred, offset=100)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: _get(fleet, cred, artefact_sha256="a" * 64, offset=-1)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _deliveries(fleet) == 0


@pytest.mark.parametrize("field", ["target_model_hash", "have_model_hash", "artefact_sha256"])
@pytest.mark.parametrize("value", ["F" * 64, "f" * 63, "f" * 65, "g" * 64, "not-a-hash"])
def test_malformed_hashes_are_invalid_not_not_found(fleet, field, value):
    cred = fleet.register().device_credential
    code = _code(lambda: _get(fleet, cred, **{field: value}))
    assert code == grpc.StatusCode.INVALID_ARGUMENT  # NOT_FOUND would tell the client to retry


def test_credentials_are_checked_before_the_request(fleet):
    fleet.register()
    code = _code(lambda: _get(fleet, "not-a-credential", target_model_hash="bad", offset=5))
    assert code == grpc.StatusCode.UNAUTHENTICATED


def test_well_formed_unknown_target_is_still_not_found(fleet):
    cred = fleet.register().device_credential
    assert _code(lambda: _get(fleet, cred, target_model_hash="f" * 64)) == grpc.StatusCode.NOT_FOUND


def test_watch_refuses_a_malformed_model_hash(fleet):
    cred = fleet.register().device_credential
    call = lambda: list(fleet.stub.WatchUpdates(  # noqa: E731
        pb.WatchUpdatesRequest(model_hash="XYZ", max_seconds=1), metadata=md(cred), timeout=10))
    assert _code(call) == grpc.StatusCode.INVALID_ARGUMENT


def test_max_chunk_bytes_floor_cap_default_and_negative(fleet_factory):
    small = fleet_factory(grpc_max_message_bytes=1 << 16)  # cap: 1 KiB under the message limit
    cred = small.register().device_credential
    msgs = _get(small, cred, max_chunk_bytes=1 << 30)
    size = msgs[0].info.artefact_size
    assert size > 1 << 16  # so the cap shows
    assert max(len(m.chunk.data) for m in msgs[1:]) == (1 << 16) - 1024
    assert len(_get(small, cred, max_chunk_bytes=1)[1].chunk.data) == MIN_CHUNK_BYTES
    code = _code(lambda: _get(small, cred, max_chunk_bytes=-5))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    # The numbers docs/protocol.md states.
    s = small.settings.model_copy(update={"grpc_max_message_bytes": 64 << 20})
    assert (MIN_CHUNK_BYTES, MAX_CHUNK_BYTES) == (1024, 4 << 20)
    assert chunk_size(0, s) == s.chunk_bytes == 256 << 10
    assert chunk_size(1 << 30, s) == MAX_CHUNK_BYTES and chunk_size(1, s) == MIN_CHUNK_BYTES


# --- samples and other limits -------------------------------------------------------------------


def test_a_resent_sample_keeps_its_first_label(fleet, images):
    xs = images
    cred = fleet.register().device_credential
    first = pb_sample(xs[0], label=3)
    relabelled = pb_sample(xs[0], label=7)
    r1 = fleet.stub.UploadSamples(stream([first]), metadata=md(cred), timeout=30)
    r2 = fleet.stub.UploadSamples(stream([relabelled, pb_sample(xs[1], 1), pb_sample(xs[1], 2)]),
                                  metadata=md(cred), timeout=30)
    assert (r1.accepted, r2.accepted, r2.duplicates) == (1, 1, 1)
    with transaction(fleet.ctx.factory) as s:
        labels = dict(s.execute(select(Sample.sample_id, Sample.label)).all())
    assert labels[first.sample_id] == 3  # the re-send did not relabel it
    assert labels[pb_sample(xs[1]).sample_id] == 1  # within one stream, too, the first wins


def test_sample_ids_are_lowercase_hex(fleet, images):
    xs = images
    cred = fleet.register().device_credential
    smp = pb_sample(xs[0])
    smp.sample_id = smp.sample_id.upper()
    r = fleet.stub.UploadSamples(stream([smp]), metadata=md(cred), timeout=30)
    assert r.accepted == 0 and [x.sample_id for x in r.rejected] == [smp.sample_id]


def test_register_and_heartbeat_length_limits(fleet):
    assert fleet.register("h" * 128).device_id
    assert _code(lambda: fleet.register("h" * 129)) == grpc.StatusCode.INVALID_ARGUMENT
    assert _code(lambda: fleet.register("")) == grpc.StatusCode.INVALID_ARGUMENT
    cred = fleet.register("hw-2").device_credential

    def beat(**kw):
        return fleet.stub.Heartbeat(pb.HeartbeatRequest(**kw), metadata=md(cred), timeout=10)

    beat(metrics={"m" * 64: 1.0}, state="s" * 32, last_error="e" * 4096)
    for bad in ({"metrics": {"m" * 65: 1.0}}, {"metrics": {f"m{i}": 1.0 for i in range(129)}},
                {"state": "s" * 33}, {"last_error": "e" * 4097}, {"model_hash": "A" * 64}):
        assert _code(lambda bad=bad: beat(**bad)) == grpc.StatusCode.INVALID_ARGUMENT, bad
