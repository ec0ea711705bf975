"""The event bus: carries the notifiers' wake-ups (server/notifier.py) between processes.

A :class:`~server.events.router.EventRouter` bridges one process's notifiers to any number
of links (a PostgreSQL LISTEN/NOTIFY channel shared by every replica and worker, a socket to
the server's child worker). A local ``notify`` goes out on every link; what arrives on one
link is delivered locally and relayed to the other links, never back to where it came from.
Links never hand a process its own messages (each message carries its sender's id).

Delivery is best effort: a message lost with a dropped connection is covered by the
periodic database reads every consumer keeps (the worker's poll, the stream hub's resync),
and a link that reconnects delivers ``None`` on every channel ("something may have
changed: re-read"). docs/scale.md#topology.
"""

from server.events.base import RESYNC, Link, Message, origin_id
from server.events.router import EventRouter, open_router

__all__ = ["RESYNC", "EventRouter", "Link", "Message", "open_router", "origin_id"]
