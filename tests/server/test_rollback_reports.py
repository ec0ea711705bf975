"""Rollbacks reported in heartbeats: validated and merged into the device's history, and shown
on the device (REST) and on the round whose version was rolled back. SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from server.db.engine import transaction
from server.db.models import Device
from server.domain import devices as D
from server.domain import rounds as R
from server.domain.errors import InvalidArgumentError
from tests.server.test_rest_api import register

BAD, OTHER = "cd" * 32, "ef" * 32


def _beat(ctx, device_id: str, rollbacks: list[dict], state: str = "rolled_back") -> None:
    with transaction(ctx.factory) as s:
        D.record_heartbeat(s, s.get(Device, device_id), model_hash="ab" * 32, active_subnet=-1, budget={},
                           metrics={}, state=state, last_error="", samples_pending=0, rollbacks=rollbacks)


def test_reports_merge_without_duplicates_and_stay_bounded(server_ctx):
    dev = register(server_ctx, "hw-merge").device.id
    first = {"model_hash": BAD, "reason": "accuracy 0.1 is below 0.9", "at_ms": 1000}
    _beat(server_ctx, dev, [first])
    _beat(server_ctx, dev, [first])  # every heartbeat repeats the device's list
    _beat(server_ctx, dev, [first, {"model_hash": OTHER, "reason": "fails to load", "at_ms": 2000}])
    with transaction(server_ctx.factory) as s:
        row = s.get(Device, dev)
        assert row.rollbacks == [first, {"model_hash": OTHER, "reason": "fails to load", "at_ms": 2000}]
        assert row.update_state == row.state == "rolled_back"
    many = [{"model_hash": f"{i:064x}", "reason": "r", "at_ms": 3000 + i} for i in range(40)]
    _beat(server_ctx, dev, many)
    with transaction(server_ctx.factory) as s:
        kept = s.get(Device, dev).rollbacks
    assert len(kept) == D.MAX_ROLLBACKS_KEPT and kept[-1] == many[-1]  # the newest are kept


@pytest.mark.parametrize("bad, field", [
    ({"model_hash": "XYZ", "reason": "", "at_ms": 1}, "model_hash"),
    ({"model_hash": BAD, "reason": "", "at_ms": -1}, "at_ms"),
    ({"model_hash": BAD, "reason": "x" * 1025, "at_ms": 1}, "reason"),
])
def test_bad_reports_are_refused(server_ctx, bad, field):
    dev = register(server_ctx, "hw-bad").device.id
    with pytest.raises(InvalidArgumentError, match=field):
        _beat(server_ctx, dev, [bad])
    with pytest.raises(InvalidArgumentError, match="at most"):
        _beat(server_ctx, dev, [{"model_hash": BAD, "reason": "", "at_ms": i} for i in range(65)])


def test_device_and_round_show_the_rollback(server_ctx, client):
    a, b = register(server_ctx, "hw-a").device.id, register(server_ctx, "hw-b").device.id
    with transaction(server_ctx.factory) as s:
        rnd = R.create_round(s, method="full", cohort={"all": True}, params={})
        rnd.status, rnd.model_hash, rnd.device_ids = R.DONE, BAD, [a, b]  # as a published round leaves it
        round_id = rnd.id
    reason = "accuracy 0.120 on 200 local labels is below the previous model's 0.900 by more than 0.05"
    _beat(server_ctx, a, [{"model_hash": BAD, "reason": reason, "at_ms": 1795384767120}])
    _beat(server_ctx, b, [{"model_hash": OTHER, "reason": "another round's version", "at_ms": 5}])

    body = client.get(f"/api/v1/devices/{a}").json()
    assert body["update_state"] == "rolled_back"
    assert body["rollbacks"] == [{"model_hash": BAD, "reason": reason, "at_ms": 1795384767120}]
    status = client.get(f"/api/v1/devices/{a}/status").json()
    assert status["rollbacks"] == body["rollbacks"] and status["update_state"] == "rolled_back"

    report = client.get(f"/api/v1/rounds/{round_id}").json()
    assert report["rollbacks"] == [{"device_id": a, "reason": reason, "at_ms": 1795384767120}]
    assert report["devices_on_version"] == 0

    fresh = register(server_ctx, "hw-new").device.id
    assert client.get(f"/api/v1/devices/{fresh}").json()["rollbacks"] == []
