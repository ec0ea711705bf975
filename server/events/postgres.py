"""PostgreSQL LISTEN/NOTIFY link: every replica and worker on one database hears the others.

Two dedicated connections (psycopg 3, autocommit), each owned by one thread: a listener
(``LISTEN``, then ``notifies()``) and a sender (``pg_notify`` from a queue, so ``send`` never
blocks a request handler or the event loop on the network). Both reconnect with capped
exponential backoff; after the listener reconnects it delivers RESYNC, since notifications
sent while it was away are lost. NOTIFY is transactional on the sender's side: our senders
run after the notifier's caller committed, so a receiver that re-reads sees the change.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from server.events.base import RESYNC, Message, OnMessage, Payload, origin_id

log = logging.getLogger(__name__)
CHANNEL = "edgeloop_events"
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 10.0
_QUEUE_MAX = 10_000  # a sender that cannot keep up drops messages rather than memory


def connect_kwargs(database_url: str) -> dict[str, Any]:
    """psycopg.connect keywords for a SQLAlchemy URL (postgresql+psycopg://...)."""
    url = make_url(database_url)
    kw: dict[str, Any] = {"host": url.host, "port": url.port or 5432, "user": url.username,
                          "password": url.password, "dbname": url.database}
    kw.update({k: v for k, v in url.query.items() if isinstance(v, str)})
    return {k: v for k, v in kw.items() if v is not None}


class PostgresLink:
    def __init__(self, database_url: str, *, channel: str = CHANNEL, origin: str | None = None) -> None:
        self._kw = connect_kwargs(database_url)
        self.channel = channel
        self.origin = origin or origin_id()
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._queue: queue.Queue[str | None] = queue.Queue(_QUEUE_MAX)
        self._on_message: OnMessage | None = None
        self._threads: list[threading.Thread] = []
        self.sent = self.received = self.reconnects = 0

    def __repr__(self) -> str:
        return f"PostgresLink({self.channel}, {self.origin})"

    def start(self, on_message: OnMessage) -> None:
        self._on_message = on_message
        for target, name in ((self._listen, "events-pg-listen"), (self._send_loop, "events-pg-send")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def wait_listening(self, timeout: float) -> bool:
        return self._listening.wait(timeout)

    def send(self, channel: str, payload: Payload) -> None:
        try:
            self._queue.put_nowait(Message.encode(self.origin, channel, payload))
        except queue.Full:
            log.warning("event bus: send queue full, dropping a %s event (replicas catch up at their next read)",
                        channel)

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for t in self._threads:  # the listener sees the flag within its 0.5 s notifies() timeout
            t.join(5)

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(autocommit=True, connect_timeout=5, application_name="edgeloop-events", **self._kw)

    def _backoff(self, delay: float) -> float:
        self._stop.wait(delay)
        return min(delay * 2, BACKOFF_MAX_S)

    def _listen(self) -> None:
        delay, first = BACKOFF_MIN_S, True
        while not self._stop.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f'LISTEN "{self.channel}"')
                    self._listening.set()
                    if not first:  # what was sent while we were away is lost: re-read
                        self.reconnects += 1
                        log.info("event bus: listening again on PostgreSQL")
                        self._dispatch(RESYNC, None)
                    first, delay = False, BACKOFF_MIN_S
                    while not self._stop.is_set():
                        for note in conn.notifies(timeout=0.5):
                            self._handle(note.payload)
            except Exception as exc:  # noqa: BLE001 - reconnect, whatever broke
                self._listening.clear()
                if self._stop.is_set():
                    return
                log.warning("event bus: PostgreSQL listener lost (%s); reconnecting in %.1f s", exc, delay)
                delay = self._backoff(delay)

    def _handle(self, text: str) -> None:
        try:
            origin, channel, payload = Message.decode(text)
        except ValueError as exc:
            log.warning("event bus: ignoring a malformed message: %s", exc)
            return
        if origin == self.origin:
            return  # our own, already delivered locally
        self.received += 1
        self._dispatch(channel, payload)

    def _dispatch(self, channel: str, payload: Payload) -> None:
        if self._on_message is not None:
            try:
                self._on_message(channel, payload)
            except Exception:  # noqa: BLE001
                log.exception("event bus: handling a %s event failed", channel)

    def _send_loop(self) -> None:
        conn: psycopg.Connection | None = None
        delay = BACKOFF_MIN_S
        pending: str | None = None
        attempts = 0
        while True:
            if pending is None:
                pending, attempts = self._queue.get(), 0
                if pending is None:  # close()
                    break
            try:
                if conn is None or conn.closed:
                    conn = self._connect()
                conn.execute("SELECT pg_notify(%s, %s)", (self.channel, pending))
                self.sent += 1
                pending, delay = None, BACKOFF_MIN_S
            except Exception as exc:  # noqa: BLE001 - reconnect and retry the message a few times
                if conn is not None:
                    conn.close()
                conn = None
                if self._stop.is_set():
                    break
                attempts += 1
                if attempts >= 3:
                    log.warning("event bus: dropping an event after %d failed sends (%s)", attempts, exc)
                    pending = None
                log.warning("event bus: PostgreSQL sender lost (%s); retrying in %.1f s", exc, delay)
                delay = self._backoff(delay)
        if conn is not None:
            conn.close()
