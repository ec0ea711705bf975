"""What a link is, and the wire form of a message (JSON, small by contract)."""

from __future__ import annotations

import json
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, Protocol

# A link that may have missed messages (it reconnected) delivers this channel: the router
# then delivers ``None`` ("re-read everything") on every notifier.
RESYNC = "*"
MAX_MESSAGE_BYTES = 7900  # PostgreSQL's NOTIFY payload limit is 8000 bytes
MAX_DEVICE_IDS = 100  # targets_changed lists at most this many ids (contract), else None

Payload = dict[str, Any] | None
OnMessage = Callable[[str, Payload], None]


def origin_id() -> str:
    """This process's id on the bus: ``host:pid:nonce`` (a restarted process is a new one)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Link(Protocol):
    """One way to other processes. ``send`` must be quick and must not raise for a lost peer
    (log and drop: consumers catch up from the database); ``start`` begins calling
    ``on_message(channel, payload)`` from a thread of the link's own."""

    def start(self, on_message: OnMessage) -> None: ...

    def send(self, channel: str, payload: Payload) -> None: ...

    def close(self) -> None: ...


class Message:
    """Encode/decode ``{"o": origin, "c": channel, "p": payload}``."""

    @staticmethod
    def encode(origin: str, channel: str, payload: Payload) -> str:
        text = json.dumps({"o": origin, "c": channel, "p": payload}, separators=(",", ":"))
        if len(text.encode()) > MAX_MESSAGE_BYTES:
            # Too big for NOTIFY: send "something changed" instead; consumers re-read.
            text = json.dumps({"o": origin, "c": channel, "p": shrink(channel, payload)}, separators=(",", ":"))
        return text

    @staticmethod
    def decode(text: str | bytes) -> tuple[str, str, Payload]:
        msg = json.loads(text)
        if not isinstance(msg, dict) or not isinstance(msg.get("o"), str) or not isinstance(msg.get("c"), str):
            raise ValueError(f"not an event message: {str(text)[:200]!r}")
        payload = msg.get("p")
        if payload is not None and not isinstance(payload, dict):
            raise ValueError(f"event payload must be an object or null, got {type(payload).__name__}")
        return msg["o"], msg["c"], payload


def shrink(channel: str, payload: Payload) -> Payload:
    """The payload with its long id list dropped (None: any device may have moved)."""
    if payload is None:
        return None
    small = {k: v for k, v in payload.items() if isinstance(v, str | int | float | bool) or v is None}
    if "device_ids" in payload:
        small["device_ids"] = None
    return small if len(json.dumps(small)) < MAX_MESSAGE_BYTES - 200 else None
