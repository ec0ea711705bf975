"""The reporter service: register (again, when the server rejects our credential), then send
a heartbeat every heartbeat interval (and at once when woken, e.g. after an update outcome).
The answer names the version the device should run; that goes to the :class:`Connection`,
where the updater service picks it up."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_agent.backoff import Backoff
from edge_agent.client import ClientError, CredentialRejected, PermanentError
from edge_agent.connection import Connection
from protos.edgeloop.v1 import fleet_pb2 as pb

log = logging.getLogger(__name__)


class ReporterService:
    name = "reporter"

    def __init__(self, conn: Connection, build: Callable[[], pb.HeartbeatRequest],
                 backoff: Backoff) -> None:
        self.conn = conn
        self._build = build  # the supervisor's snapshot of everything a heartbeat reports
        self.backoff = backoff
        self._wake = threading.Event()

    def wake(self) -> None:
        """Heartbeat now (a new model or an update outcome should be seen at once)."""
        self._wake.set()

    interrupt = wake

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            delay = self.conn.heartbeat_interval
            try:
                self.conn.ensure_identity()
                self.heartbeat()
                self.backoff.reset()
            except CredentialRejected as exc:
                if not self.conn.registered:  # Register itself refused: a wrong or missing enrollment token
                    log.error("registration refused: %s", exc)
                    self.conn.report_error(f"registration refused: {exc}")
                self.conn.forget_identity()
                delay = self.backoff.next_delay()
            except PermanentError as exc:  # the server refuses what we report: say so, retry later
                what = "heartbeat" if self.conn.registered else "registration"  # e.g. an expired enrollment token
                log.error("%s refused: %s", what, exc)
                self.conn.report_error(f"{what} refused: {exc}")
                delay = self.backoff.next_delay()
            except ClientError as exc:
                self.conn.offline(exc)
                delay = self.backoff.next_delay(exc)  # never before the server's retry-after
            self._wake.wait(delay)
            self._wake.clear()

    def heartbeat(self) -> pb.HeartbeatResponse:
        epoch = self.conn.target_epoch()
        resp = self.conn.client.heartbeat(self._build())
        self.conn.online()
        if resp.target_subnet_accuracy:
            self.conn.set_subnet_accuracy(resp.target_model_hash,
                                          [float(a) for a in resp.target_subnet_accuracy])
        self.conn.set_target(resp.target_model_hash, if_epoch=epoch)
        self.conn.suggest_interval(resp.heartbeat_interval_s)
        return resp
