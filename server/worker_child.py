"""The server's embedded round worker as a supervised child process (worker_mode=process).

Training is CPU-bound Python and torch: in the serving process it takes GIL slices from every
REST and gRPC handler. The child runs the same RoundWorker as ``edgeloop server worker`` and
talks to its parent over a socketpair (server/events/socket_link.py): the parent's
``rounds_wakeup`` (REST created a round) reaches the child at once, the child's
``targets_changed`` (a round published) reaches the parent's streams at once, on SQLite as
on PostgreSQL; the parent relays between that socket and the replica bus. The settings go
to the child on its stdin (they may hold secrets, which argv and the environment would show).

Parent side: :class:`ChildWorker` starts the child, restarts it with backoff when it dies (a
round it was running is failed as interrupted by the next child's start-up: its pid is gone),
and stops it with SIGTERM (finish the round in hand within the timeout, else fail it).
Child side: ``python -m server.worker_child --events-fd N``; it exits when its parent goes
(end of file on the socket) or on SIGTERM; it ignores SIGINT so that a Ctrl-C in a terminal
stops the parent, which then stops the child in order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from server.events.base import OnMessage
from server.events.socket_link import SocketLink
from server.settings import ServerSettings

if TYPE_CHECKING:
    from server.context import ServerContext

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parent.parent
RESTART_MIN_S, RESTART_MAX_S = 1.0, 30.0
HEALTHY_RUN_S = 60.0  # a child that ran this long restarts at once after dying


class ChildWorker:
    """Parent side: start, supervise and stop the child worker process."""

    def __init__(self, ctx: ServerContext, *, stop_timeout: float = 30.0) -> None:
        self.ctx = ctx
        self.stop_timeout = stop_timeout
        self.proc: subprocess.Popen | None = None
        self.link: SocketLink | None = None
        self.starts = 0
        self.worker_id: str | None = None  # the running child's, once it said it is ready
        self.ready = threading.Event()  # the current child is up and waiting for rounds
        self.ready_after_s: float | None = None  # start-up time of the last child (imports, open)
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self._supervisor = threading.Thread(target=self._supervise, name="worker-supervisor", daemon=True)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> None:
        self._spawn()
        self._supervisor.start()

    def _spawn(self) -> None:
        parent_end, child_end = socket.socketpair()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
        cmd = [sys.executable, "-m", "server.worker_child", "--events-fd", str(child_end.fileno())]
        with self._lock:
            if self._stopping.is_set():
                parent_end.close()
                child_end.close()
                return
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, pass_fds=[child_end.fileno()], env=env)
            child_end.close()
            assert proc.stdin is not None
            config = {"settings": self.ctx.settings.model_dump(mode="json"), "stop_timeout": self.stop_timeout}
            try:
                proc.stdin.write(json.dumps(config).encode())
                proc.stdin.close()
            except OSError:  # died at once; the supervisor sees it
                pass
            self.proc = proc
            self.starts += 1
            self.ready.clear()
            link = SocketLink(parent_end, on_control=self._control(time.monotonic()))
            self.link = link
        assert self.ctx.events is not None
        self.ctx.events.add(link)
        log.info("round worker child process %d started", proc.pid)

    def _control(self, spawned: float) -> OnMessage:
        def on_control(channel: str, payload: dict | None) -> None:
            if channel == "_ready" and payload is not None:
                self.worker_id = str(payload.get("worker_id"))
                self.ready_after_s = round(time.monotonic() - spawned, 2)
                log.info("round worker %s ready after %.1f s", self.worker_id, self.ready_after_s)
                self.ready.set()

        return on_control

    def wait_ready(self, timeout: float) -> bool:
        return self.ready.wait(timeout)

    def _supervise(self) -> None:
        delay = RESTART_MIN_S
        while True:
            proc = self.proc
            if proc is None:
                return
            started = time.monotonic()
            rc = proc.wait()
            link = self.link
            if link is not None and self.ctx.events is not None:
                self.ctx.events.remove(link)
                link.close()
            if self._stopping.is_set():
                return
            ran = time.monotonic() - started
            delay = RESTART_MIN_S if ran >= HEALTHY_RUN_S else delay
            log.error("round worker child process %d exited (status %s) after %.0f s; restarting in %.1f s",
                      proc.pid, rc, ran, delay)
            if self._stopping.wait(delay):
                return
            delay = min(delay * 2, RESTART_MAX_S)
            try:
                self._spawn()
            except Exception:  # noqa: BLE001 - try again after the next backoff
                log.exception("restarting the round worker child failed")

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM: the child finishes the round in hand within ``stop_timeout``, else fails it."""
        with self._lock:
            self._stopping.set()
            proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait((timeout or self.stop_timeout) + 15)
            except subprocess.TimeoutExpired:
                log.error("round worker child %d did not stop; killing it", proc.pid)
                proc.kill()
                proc.wait(10)
        if self._supervisor.is_alive():
            self._supervisor.join(10)
        link = self.link
        if link is not None:
            if self.ctx.events is not None:
                self.ctx.events.remove(link)
            link.close()


def child_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="server.worker_child")
    parser.add_argument("--events-fd", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us in order
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    config = json.loads(sys.stdin.buffer.read() or b"{}")
    settings = ServerSettings(**config["settings"])
    from edgeloop.logs import setup_logging

    setup_logging(settings.log_level, "worker ")
    # The parent relays our events to the replica bus; a bus of our own would deliver twice.
    settings = settings.model_copy(update={"event_bus": "local"})
    from server.context import ServerContext
    from server.worker import RoundWorker

    sock = socket.socket(fileno=args.events_fd)
    ctx = ServerContext.open(settings, run_migrations=False)
    assert ctx.events is not None
    link = SocketLink(sock, on_close=stop.set)  # parent gone: stop
    ctx.events.add(link)
    worker = RoundWorker(settings, ctx.factory, ctx.blobs, rounds_wakeup=ctx.rounds_wakeup,
                         targets_changed=ctx.targets_changed)
    worker.start()
    link.send("_ready", {"worker_id": worker.worker_id, "pid": os.getpid()})
    log.info("round worker %s started (child of %d)", worker.worker_id, os.getppid())
    stop.wait()
    worker.stop(timeout=float(config.get("stop_timeout", 30.0)))
    ctx.close()
    return 0


if __name__ == "__main__":
    sys.exit(child_main())
