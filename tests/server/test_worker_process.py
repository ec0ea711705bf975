"""The embedded round worker as a supervised child process (worker_mode=process, the
default): a round created through REST wakes the child at once (the poll is set to a minute,
so only the wake-up can make it prompt), the child trains and publishes, and its
targets_changed reaches the serving process's notifier with the contract's payload; a child
that dies is restarted; stopping the server stops the child. SQLite: no LISTEN/NOTIFY, the
socketpair link carries it all."""

from __future__ import annotations

import os
import queue
import signal

import httpx
import pytest

from server.db.engine import transaction
from server.db.models import Round
from server.domain import rounds as R
from server.worker_child import ChildWorker
from tests.server.test_rest_api import ingest, random_images, register

TOKEN = "op-" + "t" * 40
PARAMS = {"epochs": 1, "min_labelled": 1, "skip_if_worse": False}
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def sqlite_settings(tmp_path):
    from server.settings import ServerSettings

    return ServerSettings(
        data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'edgeloop.db'}", model_kind="mlp",
        input_shape="1,28,28", num_classes=10, insecure=True, rest_host="127.0.0.1", rest_port=0,
        grpc_host="127.0.0.1", grpc_port=0, operator_token=TOKEN, fsync=False, rest_auth_fail_rate_per_s=0,
        worker_poll_s=60.0, worker_heartbeat_s=1.0, worker_stale_s=30.0, log_level="INFO",
    )


def _round(server, params: dict) -> str:
    resp = httpx.post(f"http://127.0.0.1:{server.rest_port}/api/v1/rounds", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"method": "full", "cohort": {"all": True}, "params": params}, timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()["id"]


def _published(events: queue.Queue, round_id: str, timeout: float) -> dict:
    while True:
        payload = events.get(timeout=timeout)  # queue.Empty fails the test
        if payload and payload.get("round_id") == round_id:
            return payload


def _start(settings):
    from server.app import EdgeLoopServer

    server = EdgeLoopServer(settings)
    server.start()
    child = server.worker
    assert isinstance(child, ChildWorker)
    assert child.wait_ready(120), "the child worker never came up"
    assert child.pid != os.getpid()
    dev = register(server.ctx, "hw-child").device.id
    ingest(server.ctx, dev, random_images(40, seed=1), [i % 10 for i in range(40)])
    events: queue.Queue = queue.Queue()
    server.ctx.targets_changed.subscribe(events.put)
    return server, child, dev, events


def test_child_worker_trains_rest_rounds_and_publishes_to_the_server(sqlite_settings):
    server, child, dev, events = _start(sqlite_settings)
    try:
        rid = _round(server, PARAMS)
        payload = _published(events, rid, timeout=120)  # poll is 60 s: the REST wake-up reached it
        assert payload["device_ids"] == [dev]
        with transaction(server.ctx.factory) as s:
            rnd = s.get(Round, rid)
            assert rnd.status == R.DONE and rnd.worker_id == child.worker_id
            assert rnd.worker_id.split(":")[1] == str(child.pid)  # trained in the child, not here
    finally:
        server.stop()
    assert child.proc is not None and child.proc.poll() is not None, "stop() left the child running"


@pytest.mark.slow  # two child start-ups (each imports torch): ~25 s on two busy cores
def test_a_child_that_dies_is_restarted(sqlite_settings):
    server, child, _, events = _start(sqlite_settings)
    try:
        first_pid = child.pid
        os.kill(first_pid, signal.SIGKILL)
        child.ready.clear()
        assert child.wait_ready(120), "the supervisor did not restart the child"
        assert child.pid != first_pid and child.starts == 2
        rid = _round(server, PARAMS)
        assert _published(events, rid, timeout=120)["round_id"] == rid
    finally:
        server.stop()


def test_thread_mode_keeps_the_worker_in_the_server(sqlite_settings):
    from server.app import EdgeLoopServer
    from server.worker import RoundWorker

    server = EdgeLoopServer(sqlite_settings.model_copy(update={"worker_mode": "thread"}))
    try:
        assert isinstance(server.worker, RoundWorker)
        assert server.ctx.events is not None and server.ctx.events.links == ()  # SQLite, one process
    finally:
        server.stop()
