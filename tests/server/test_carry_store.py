"""Policy state carried between rounds survives a server restart."""

from __future__ import annotations

import uuid

import torch

from server.db.engine import transaction
from server.db.models import Round
from server.domain import rounds as R
from server.training.carry_store import decode_carry, encode_carry
from server.worker import RoundWorker
from shared.dpu import ShadowChain


def _carry(scale: float) -> dict:
    return {
        "residual": {"net.1.weight": torch.full((3, 4), scale), "net.1.bias": torch.zeros(3)},
        "shadow": ShadowChain(7, {"net.1.weight": torch.arange(12.0).reshape(3, 4) * scale}, rounds=2),
        "note": "x",
    }


def test_carry_round_trip_is_exact() -> None:
    back = decode_carry(encode_carry(_carry(0.5)))
    assert torch.equal(back["residual"]["net.1.weight"], torch.full((3, 4), 0.5))
    assert back["shadow"].seed == 7 and back["shadow"].rounds == 2
    assert torch.equal(back["shadow"].state["net.1.weight"], torch.arange(12.0).reshape(3, 4) * 0.5)
    assert back["note"] == "x"
    assert decode_carry(encode_carry({})) == {}


def test_worker_restores_the_newest_carry_per_method(server_ctx) -> None:
    older, newer = server_ctx.blobs.put(encode_carry(_carry(1.0))), server_ctx.blobs.put(encode_carry(_carry(2.0)))
    with transaction(server_ctx.factory) as s:
        for i, sha in enumerate((older, newer)):
            rnd = Round(id=uuid.uuid4().hex, status=R.QUEUED, method="dpu", cohort={"all": True}, params={})
            s.add(rnd)
            s.flush()
            R.transition(s, rnd, R.TRAINING)
            R.transition(s, rnd, R.SKIPPED, reason="test")
            rnd.metrics = {"carry_sha256": sha}
            rnd.finished_at = rnd.finished_at.replace(microsecond=i)  # strictly ordered
    worker = RoundWorker(server_ctx.settings, server_ctx.factory, server_ctx.blobs,
                         rounds_wakeup=server_ctx.rounds_wakeup, targets_changed=server_ctx.targets_changed)
    worker._load_carry()
    assert torch.equal(worker.carry["dpu"]["residual"]["net.1.weight"], torch.full((3, 4), 2.0))
    assert worker._save_carry("dpu") == newer  # content-addressed: the same state, the same blob
