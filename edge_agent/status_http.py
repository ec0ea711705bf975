"""A tiny local HTTP endpoint for the device's operator: status, health, and budget changes.

stdlib ``http.server`` only: the device install carries no web framework. Binds to
127.0.0.1 by default; exposing it on a network is a deliberate choice of ``host`` and needs a
``token`` (the agent's settings enforce it). Routes::

    GET /status    -> 200, JSON from get_status()
    GET /healthz   -> 200, "ok"
    PUT /budget    -> JSON object body (<= 64 KiB) passed to on_put_budget; 200 with its result
    POST /few-shot -> JSON object body (<= 64 KiB) passed to on_post_few_shot (a support sample
                      for the pmeta learner, edge_agent/few_shot.py); 200 with its result
    PUT /domain    -> {"domain": "<name>" | null} passed to on_put_domain (the da3 learner's
                      active domain, edge_agent/domains.py); 200 with its result

Errors are JSON ``{"error": ...}``: 400 bad or oversized body (or a ValueError from the
callback), 401 a missing or wrong token (when the server has one), 404 unknown path, 405 wrong
method, 500 a failing callback (logged).

With a ``token`` every route but /healthz needs ``Authorization: Bearer <token>``; the agent's
settings require one for any address other than loopback (:func:`is_loopback`).
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
_MAX_DRAIN_BYTES = 1 << 20
_ROUTES = {"/status": "GET", "/healthz": "GET", "/budget": "PUT", "/few-shot": "POST",
           "/domain": "PUT"}


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine: ``localhost`` or a loopback IP literal."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a hung client must not keep the agent from exiting
    allow_reuse_address = True

    def __init__(self, address, handler, owner: StatusServer) -> None:
        if ":" in address[0]:  # an IPv6 literal such as "::1"
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)
        self.owner = owner


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # seconds a client may take to send its request
    server_version = "EdgeLoopAgent"

    def _send(
        self, code: int, body: Any, content_type: str = "application/json", headers=()
    ) -> None:
        data = body if isinstance(body, bytes) else json.dumps(body, default=str).encode()
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for key, value in headers:
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, code: int, message: str, headers=()) -> None:
        self._send(code, {"error": message}, headers=headers)

    def _route(self, method: str) -> str | None:
        """The path if ``method`` is allowed on it; otherwise answers 404/405 and returns None."""
        path = urlsplit(self.path).path
        allowed = _ROUTES.get(path)
        if allowed is None:
            self._error(404, f"unknown path {path!r}")
            return None
        if method != allowed:
            self._error(405, f"{method} not allowed on {path}; use {allowed}", [("Allow", allowed)])
            return None
        if path != "/healthz" and not self._authorised():
            self.close_connection = True
            try:  # read (a bounded amount of) any body first, so the client sees the 401
                self._drain(min(max(int(self.headers.get("Content-Length") or 0), 0), _MAX_DRAIN_BYTES))
            except ValueError:
                pass
            self._error(401, "this status endpoint needs 'Authorization: Bearer <status_token>'",
                        [("WWW-Authenticate", "Bearer")])
            return None
        return path

    def _authorised(self) -> bool:
        token = self.server.owner.token
        if not token:
            return True
        given = self.headers.get("Authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())

    def do_GET(self) -> None:
        path = self._route("GET")
        if path == "/healthz":
            self._send(200, b"ok", "text/plain; charset=utf-8")
        elif path == "/status":
            try:
                status = self.server.owner.get_status()
            except Exception as exc:
                logger.exception("status callback failed")
                self._error(500, f"status unavailable: {exc}")
                return
            self._send(200, status)

    def do_PUT(self) -> None:
        path = self._route("PUT")
        if path == "/domain":
            self._call(self.server.owner.on_put_domain, "domains need learner=da3 on this agent")
        elif path == "/budget":
            self._call(self.server.owner.on_put_budget, "budget changes are not enabled on this agent")

    def do_POST(self) -> None:
        if self._route("POST") != "/few-shot":
            return
        self._call(self.server.owner.on_post_few_shot,
                   "few-shot samples need learner=pmeta on this agent")

    def _call(self, on_put: Callable[[dict], dict] | None, disabled: str) -> None:
        if on_put is None:
            self._error(501, disabled)
            return
        body = self._read_json_object()
        if body is None:
            return
        try:
            result = on_put(body)
        except ValueError as exc:  # the callback's validation: the client's fault
            self._error(400, str(exc))
            return
        except Exception as exc:
            logger.exception("%s callback failed", self.path)
            self._error(500, f"{self.command} {self.path} failed: {exc}")
            return
        self._send(200, result)

    def _read_json_object(self) -> dict | None:
        length_header = self.headers.get("Content-Length")
        if length_header is None:
            self.close_connection = True
            self._error(400, f"{self.command} {self.path} needs a Content-Length header")
            return None
        try:
            length = int(length_header)
        except ValueError:
            length = -1
        if length < 0:
            self.close_connection = True
            self._error(400, f"bad Content-Length {length_header!r}")
            return None
        if length > MAX_BODY_BYTES:
            # Read (a bounded amount of) it before answering: closing a socket with unread
            # data makes the client see a reset instead of our 400.
            self.close_connection = True
            self._drain(min(length, _MAX_DRAIN_BYTES))
            self._error(400, f"body of {length} bytes exceeds the {MAX_BODY_BYTES}-byte limit")
            return None
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            self._error(400, f"body is not valid JSON: {exc}")
            return None
        if not isinstance(body, dict):
            self._error(400, f"body must be a JSON object, got {type(body).__name__}")
            return None
        return body

    def _drain(self, n: int) -> None:
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 65536))
                if not chunk:
                    break
                n -= len(chunk)
        except OSError:
            pass

    def _other(self) -> None:
        self._route(self.command)

    do_DELETE = do_PATCH = _other

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s - " + format, self.address_string(), *args)


class StatusServer:
    """Serves the routes above from a daemon thread; ``port=0`` picks a free port."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        get_status: Callable[[], dict] | None = None,
        on_put_budget: Callable[[dict], dict] | None = None,
        on_post_few_shot: Callable[[dict], dict] | None = None,
        on_put_domain: Callable[[dict], dict] | None = None,
        token: str = "",
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must lie in [0, 65535], got {port}")
        self.host = host
        self.token = token
        self._requested_port = port
        self.get_status = get_status or dict
        self.on_put_budget = on_put_budget
        self.on_post_few_shot = on_post_few_shot
        self.on_put_domain = on_put_domain
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The bound port once started (the requested one before)."""
        return self._server.server_address[1] if self._server is not None else self._requested_port

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("status server already started")
        self._server = _Server((self.host, self._requested_port), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="status-http",
            daemon=True,
        )
        self._thread.start()
        logger.info("status server listening on http://%s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server, self._thread = None, None

    def __enter__(self) -> StatusServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
