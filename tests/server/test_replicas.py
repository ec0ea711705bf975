"""Two server replicas (real `edgeloop server run` processes) on one PostgreSQL database and
one data directory: a round created through replica A's REST and trained by A's child worker
reaches a real WatchUpdates stream held on replica B; then, with A gone and the REST replica
running no worker of its own, a separate `edgeloop server worker` process is woken by B's REST
over the bus, claims the round, and its publish reaches B's stream the same way.

Keepalives and worker polls are set to a minute: a stream message or a claim sooner than
that can only come from an event crossing processes (PostgreSQL LISTEN/NOTIFY)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import timezone
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest

from protos.edgeloop.v1 import fleet_pb2 as pb
from protos.edgeloop.v1 import fleet_pb2_grpc as pb_grpc
from server.context import ServerContext
from server.db.engine import transaction
from server.db.models import Round
from server.domain import rounds as R
from server.domain.operators import ensure_operator_access
from server.settings import ServerSettings
from tests.server.grpc_fleet import create_enrollment_token, md, pb_sample, stream

pytestmark = [pytest.mark.postgres]
ROOT = Path(__file__).resolve().parents[2]
TOKEN = "op-" + "r" * 40
SLOW_S = "60"  # keepalive and worker poll: far above every wait below
ROUND = {"method": "full", "cohort": {"all": True}, "params": {"epochs": 1, "min_labelled": 1, "skip_if_worse": False}}


@pytest.fixture
def cluster(tmp_path, postgres_url, processes):
    env = {
        "EDGELOOP_DATA_DIR": str(tmp_path / "shared-data"), "EDGELOOP_DATABASE_URL": postgres_url,
        "EDGELOOP_MODEL_KIND": "mlp", "EDGELOOP_INPUT_SHAPE": "1,8,8", "EDGELOOP_NUM_CLASSES": "10",
        "EDGELOOP_DRESS_SPARSITIES": "", "EDGELOOP_FSYNC": "false", "EDGELOOP_MIGRATE_ON_START": "false",
        "EDGELOOP_INSECURE": "true", "EDGELOOP_OPERATOR_TOKEN": TOKEN, "EDGELOOP_WATCH_KEEPALIVE_S": SLOW_S,
        "EDGELOOP_WORKER_POLL_S": SLOW_S, "EDGELOOP_WORKER_HEARTBEAT_S": "1", "EDGELOOP_WORKER_STALE_S": "30",
        "EDGELOOP_REST_HOST": "127.0.0.1", "EDGELOOP_GRPC_HOST": "127.0.0.1", "EDGELOOP_LOG_LEVEL": "INFO",
    }
    settings = ServerSettings(**{k[len("EDGELOOP_"):].lower(): v for k, v in env.items()})
    ctx = ServerContext.open(settings)  # the one-shot migrate step (and version 0)
    # Like compose's init step: the provisioned admin token is stored before the replicas start
    # (two replicas inserting it at the same moment: one fails on the primary key).
    ensure_operator_access(ctx.factory, settings.data_dir, TOKEN)
    full_env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

    def start(name: str, *argv: str, **extra: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        proc = subprocess.Popen([sys.executable, "-m", "edgeloop", "server", *argv], cwd=ROOT,
                                env={**full_env, **extra}, stdout=log.open("w"), stderr=subprocess.STDOUT)
        processes.append(proc)
        return proc, log

    def replica(name: str, **extra: str) -> tuple[subprocess.Popen, dict]:
        ready = tmp_path / f"{name}.ready.json"
        proc, log = start(name, "run", "--rest-port", "0", "--grpc-port", "0", "--ready-file", str(ready), **extra)
        return proc, {"ready": ready, "log": log}

    yield ctx, start, replica
    ctx.close()


def _wait(condition, timeout: float, what: str, procs=()):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        for p in procs:
            assert p.poll() is None, f"a process exited while waiting for {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def _create_round(rest_port: int) -> str:
    resp = httpx.post(f"http://127.0.0.1:{rest_port}/api/v1/rounds", json=ROUND, timeout=30,
                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def _next_target(watch, ctx, round_id: str) -> tuple[str, float]:
    """The next stream message (a new target, not a keepalive) and how long after the round
    was marked done it arrived."""
    msg = next(watch)
    received = time.time()
    with transaction(ctx.factory) as s:
        rnd = s.get(Round, round_id)
        assert rnd.status == R.DONE, (rnd.status, rnd.reason)
        done = rnd.finished_at.replace(tzinfo=timezone.utc).timestamp()
        assert not msg.keepalive and msg.target_model_hash == rnd.model_hash and msg.round_id == round_id
        return rnd.worker_id, received - done


@pytest.mark.slow  # three server processes and a child worker start: ~80 s on two busy cores
def test_a_round_published_through_one_replica_reaches_a_stream_on_the_other(cluster):
    ctx, start, replica = cluster
    a, a_files = replica("replica-a")  # embedded worker: a child process (worker_mode=process)
    b, b_files = replica("replica-b", EDGELOOP_EMBEDDED_WORKER="false")
    ports = {name: json.loads(_wait(lambda f=f: f["ready"].exists() and f["ready"].read_text(), 90,
                                    f"{name} to start", [a, b]))
             for name, f in (("a", a_files), ("b", b_files))}
    assert ports["a"]["pid"] != ports["b"]["pid"]
    marks = [("replicas up", time.monotonic())]

    channel = grpc.insecure_channel(f"127.0.0.1:{ports['b']['grpc_port']}")
    stub = pb_grpc.EdgeFleetStub(channel)
    reg = stub.Register(pb.RegisterRequest(enrollment_token=create_enrollment_token(ctx), hardware_id="hw-b"),
                        timeout=30)
    cred = reg.device_credential
    x = np.random.default_rng(0).integers(0, 17, size=(30, 1, 8, 8), dtype=np.uint8)
    stub.UploadSamples(stream([pb_sample(x[i], i % 10) for i in range(30)]), metadata=md(cred), timeout=60)
    watch = stub.WatchUpdates(pb.WatchUpdatesRequest(max_seconds=600), metadata=md(cred), timeout=240)
    assert next(watch).target_model_hash == reg.target_model_hash

    marks.append(("device registered, samples up, stream open", time.monotonic()))
    rid = _create_round(ports["a"]["rest_port"])
    worker_a, latency_a = _next_target(watch, ctx, rid)
    assert worker_a.split(":")[1] not in (str(ports["a"]["pid"]), str(ports["b"]["pid"]))  # A's child trained it

    marks.append(("round 1 on B's stream", time.monotonic()))
    # A goes; a worker process of its own does the training from now on.
    a.terminate()
    assert a.wait(60) == 0, a_files["log"].read_text()[-3000:]
    w, w_log = start("worker", "worker")
    _wait(lambda: "round worker" in w_log.read_text() and "started" in w_log.read_text(), 90, "the worker", [w, b])
    marks.append(("A stopped, worker process up", time.monotonic()))
    rid2 = _create_round(ports["b"]["rest_port"])  # claimed at once only if B's wake-up reached it
    worker_w, latency_w = _next_target(watch, ctx, rid2)
    assert worker_w.split(":")[1] == str(w.pid)
    marks.append(("round 2 on B's stream", time.monotonic()))
    watch.cancel()
    channel.close()
    print(" | ".join(f"{what} +{t - marks[0][1]:.1f} s" for what, t in marks))
    print(f"cross-replica delivery (round done -> stream message on B): via A's child {latency_a * 1000:.0f} ms, "
          f"via worker process {latency_w * 1000:.0f} ms")
    w.terminate()
    assert w.wait(60) == 0
