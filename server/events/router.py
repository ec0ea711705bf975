"""Bridges a process's notifiers to its links (see the package docstring)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from functools import partial

from server.events.base import RESYNC, Link, Payload
from server.notifier import Notifier

log = logging.getLogger(__name__)


class EventRouter:
    def __init__(self, notifiers: Mapping[str, Notifier]) -> None:
        self.notifiers = dict(notifiers)
        self._links: tuple[Link, ...] = ()
        self._lock = threading.Lock()
        for channel, notifier in self.notifiers.items():
            notifier.forward = partial(self._local, channel)

    def add(self, link: Link) -> Link:
        with self._lock:
            self._links = (*self._links, link)
        link.start(partial(self._arrived, link))
        return link

    def remove(self, link: Link) -> None:
        with self._lock:
            self._links = tuple(x for x in self._links if x is not link)

    @property
    def links(self) -> tuple[Link, ...]:
        return self._links

    def _local(self, channel: str, payload: Payload) -> None:
        for link in self._links:
            link.send(channel, payload)

    def _arrived(self, source: Link, channel: str, payload: Payload) -> None:
        channels = list(self.notifiers) if channel == RESYNC else [channel]
        for ch in channels:
            notifier = self.notifiers.get(ch)
            if notifier is None:
                log.debug("event on unknown channel %r dropped", ch)
                continue
            notifier.deliver(None if channel == RESYNC else payload)
            for link in self._links:
                if link is not source:
                    link.send(ch, None if channel == RESYNC else payload)

    def close(self) -> None:
        for notifier in self.notifiers.values():
            notifier.forward = None
        with self._lock:
            links, self._links = self._links, ()
        for link in links:
            try:
                link.close()
            except Exception:  # noqa: BLE001 - closing must finish
                log.exception("closing event link %r failed", link)


def bus_kind(setting: str, database_url: str) -> str:
    """'postgres' or 'local' for the ``event_bus`` setting and the database URL."""
    if setting == "auto":
        return "postgres" if database_url.startswith("postgresql") else "local"
    return setting


def open_router(notifiers: Mapping[str, Notifier], *, event_bus: str, database_url: str) -> EventRouter:
    """A router with the bus the settings name (none for 'local': notifiers stay in-process,
    and the server adds its child worker's socket link itself)."""
    router = EventRouter(notifiers)
    kind = bus_kind(event_bus, database_url)
    if kind == "postgres":
        if not database_url.startswith("postgresql"):
            raise ValueError("event_bus=postgres needs a PostgreSQL database_url")
        from server.events.postgres import PostgresLink

        link = PostgresLink(database_url)
        router.add(link)
        if not link.wait_listening(10.0):
            log.warning("event bus: not yet listening on PostgreSQL; retrying in the background")
    elif kind != "local":
        raise ValueError(f"unknown event_bus {kind!r}")
    return router
