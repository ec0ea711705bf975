"""A point-to-point link over a connected stream socket (a socketpair between the server and
its child worker): newline-delimited JSON messages, one reader thread.

Works on every database (SQLite has no LISTEN/NOTIFY) and costs a local write per event,
not a database round trip or a poll; the peer's end of file tells each side the other is
gone (the child exits when its parent does).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable

from server.events.base import Message, OnMessage, Payload, origin_id

log = logging.getLogger(__name__)
_MAX_LINE = 1 << 20  # a peer sending more is broken: drop the link


class SocketLink:
    def __init__(self, sock: socket.socket, *, on_close: Callable[[], None] | None = None,
                 on_control: OnMessage | None = None, origin: str | None = None) -> None:
        self._sock = sock
        self._on_close = on_close
        self._on_control = on_control  # channels starting with "_": between the two ends only
        self.origin = origin or origin_id()
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = self.received = 0

    def __repr__(self) -> str:
        return f"SocketLink({self.origin})"

    def start(self, on_message: OnMessage) -> None:
        self._thread = threading.Thread(target=self._read, args=(on_message,), name="events-socket", daemon=True)
        self._thread.start()

    def send(self, channel: str, payload: Payload) -> None:
        self.send_raw(Message.encode(self.origin, channel, payload))

    def send_raw(self, text: str) -> None:
        if self._closed.is_set():
            return
        data = text.encode() + b"\n"
        try:
            with self._lock:
                self._sock.sendall(data)
            self.sent += 1
        except OSError as exc:  # the peer is gone; its supervisor restarts it
            log.debug("event link: send failed: %s", exc)

    def _read(self, on_message: OnMessage) -> None:
        buf = b""
        try:
            while True:
                chunk = self._sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
                if len(buf) > _MAX_LINE and b"\n" not in buf:
                    log.warning("event link: peer sent an over-long line; closing")
                    break
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if line:
                        self._handle(line, on_message)
        except OSError as exc:
            if not self._closed.is_set():
                log.debug("event link: read failed: %s", exc)
        finally:
            closed_by_us = self._closed.is_set()
            self._closed.set()
            if not closed_by_us and self._on_close is not None:
                self._on_close()

    def _handle(self, line: bytes, on_message: OnMessage) -> None:
        try:
            origin, channel, payload = Message.decode(line)
        except ValueError as exc:
            log.warning("event link: ignoring a malformed message: %s", exc)
            return
        if origin == self.origin:
            return
        self.received += 1
        try:
            if channel.startswith("_"):
                if self._on_control is not None:
                    self._on_control(channel, payload)
                return
            on_message(channel, payload)
        except Exception:  # noqa: BLE001
            log.exception("event link: handling a %s event failed", channel)

    def close(self) -> None:
        if self._closed.is_set() and self._thread is None:
            return
        self._closed.set()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
