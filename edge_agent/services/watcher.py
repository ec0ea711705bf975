"""The watch service: hold a WatchUpdates stream so a new version is noticed at once, not at
the next heartbeat. Heartbeats stay the fallback while the stream is down."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from edge_agent.backoff import Backoff
from edge_agent.client import ClientError
from edge_agent.connection import Connection

log = logging.getLogger(__name__)


class WatcherService:
    name = "watcher"

    def __init__(self, conn: Connection, running_hash: Callable[[], str], backoff: Backoff) -> None:
        self.conn = conn
        self._running_hash = running_hash
        self.backoff = backoff

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not self.conn.registered:
                stop.wait(0.2)
                continue
            try:
                for msg in self.conn.client.watch(self._running_hash()):
                    self.backoff.reset()
                    if stop.is_set():
                        return
                    if msg.target_model_hash:
                        self.conn.set_target(msg.target_model_hash)
            except ClientError as exc:  # CredentialRejected included: the reporter registers again
                stop.wait(self.backoff.next_delay(exc))  # never before the server's retry-after
