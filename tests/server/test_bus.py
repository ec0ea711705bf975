"""The event bus (server/events): PostgreSQL LISTEN/NOTIFY between routers on one real
database, the socket link a server shares with its child worker, relaying between the two,
never an echo of one's own messages, oversized payloads shrunk, and a listener that lost
its connection reconnecting and asking for a re-read."""

from __future__ import annotations

import queue
import socket

import psycopg
import pytest

from server.events import RESYNC, EventRouter
from server.events.base import Message
from server.events.postgres import PostgresLink, connect_kwargs
from server.events.router import bus_kind, open_router
from server.events.socket_link import SocketLink
from server.notifier import Notifier

WAIT_S = 20.0


def notifiers() -> dict[str, Notifier]:
    return {name: Notifier(name) for name in ("rounds", "targets", "devices")}


class Inbox:
    """Every payload a router's notifiers deliver, as (channel, payload)."""

    def __init__(self, router: EventRouter) -> None:
        self.q: queue.Queue = queue.Queue()
        for name, n in router.notifiers.items():
            n.subscribe(lambda p, name=name: self.q.put((name, p)))

    def next(self) -> tuple[str, dict | None]:
        return self.q.get(timeout=WAIT_S)

    def empty(self) -> bool:
        return self.q.empty()


@pytest.fixture
def pg_router(postgres_url):
    made: list[EventRouter] = []

    def make() -> EventRouter:
        router = open_router(notifiers(), event_bus="postgres", database_url=postgres_url)
        made.append(router)
        return router

    yield make
    for r in made:
        r.close()


def test_bus_kind_follows_the_database():
    assert bus_kind("auto", "postgresql+psycopg://u@h/db") == "postgres"
    assert bus_kind("auto", "sqlite:///x.db") == "local"
    assert bus_kind("local", "postgresql+psycopg://u@h/db") == "local"
    with pytest.raises(ValueError, match="PostgreSQL"):
        open_router(notifiers(), event_bus="postgres", database_url="sqlite:///x.db")


def test_message_shrinks_long_id_lists_and_refuses_garbage():
    ids = [f"dev-{i:05d}" for i in range(2000)]
    origin, channel, payload = Message.decode(Message.encode("me", "targets", {"round_id": "r", "device_ids": ids}))
    assert (origin, channel, payload) == ("me", "targets", {"round_id": "r", "device_ids": None})
    for bad in (b"[]", b'{"c": "x"}', b'{"o": "a", "c": "x", "p": [1]}', b"not json"):
        with pytest.raises(ValueError):
            Message.decode(bad)


@pytest.mark.postgres
def test_postgres_bus_carries_payloads_between_replicas_without_echo(pg_router):
    a, b = pg_router(), pg_router()
    inbox_a, inbox_b = Inbox(a), Inbox(b)
    a.notifiers["targets"].notify({"round_id": "r1", "device_ids": ["d1", "d2"]})
    assert inbox_a.next() == ("targets", {"round_id": "r1", "device_ids": ["d1", "d2"]})  # local, at once
    assert inbox_b.next() == ("targets", {"round_id": "r1", "device_ids": ["d1", "d2"]})
    b.notifiers["devices"].notify({"device_id": "d9"})
    assert inbox_b.next() == ("devices", {"device_id": "d9"})
    # A hears B's message after its own would have come back (one listener, in order): no echo.
    assert inbox_a.next() == ("devices", {"device_id": "d9"})
    assert inbox_a.empty() and inbox_b.empty()
    # An id list too long for NOTIFY arrives as "any device".
    a.notifiers["targets"].notify({"round_id": "r2", "device_ids": [f"{i:032d}" for i in range(400)]})
    inbox_a.next()
    assert inbox_b.next() == ("targets", {"round_id": "r2", "device_ids": None})


@pytest.mark.postgres
def test_a_server_relays_between_its_child_and_the_replicas(pg_router):
    """parent (PG + socket) <-> child (socket only), and another replica on PG."""
    parent, replica = pg_router(), pg_router()
    child = EventRouter(notifiers())
    here, there = socket.socketpair()
    parent.add(SocketLink(here))
    child.add(SocketLink(there))
    inbox_parent, inbox_replica, inbox_child = Inbox(parent), Inbox(replica), Inbox(child)
    try:
        child.notifiers["targets"].notify({"round_id": "r", "device_ids": None})  # the child published
        inbox_child.next()
        assert inbox_parent.next() == ("targets", {"round_id": "r", "device_ids": None})
        assert inbox_replica.next() == ("targets", {"round_id": "r", "device_ids": None})
        replica.notifiers["rounds"].notify({"round_id": "q"})  # REST on another replica queued a round
        inbox_replica.next()
        assert inbox_parent.next() == ("rounds", {"round_id": "q"})
        assert inbox_child.next() == ("rounds", {"round_id": "q"})
        assert inbox_child.empty()  # its own targets event did not come back to it
    finally:
        child.close()


@pytest.mark.postgres
def test_listener_reconnects_and_asks_for_a_reread(pg_router, postgres_url):
    a, b = pg_router(), pg_router()
    inbox_a = Inbox(a)
    link = a.links[0]
    assert isinstance(link, PostgresLink)
    with psycopg.connect(autocommit=True, **connect_kwargs(postgres_url)) as admin:
        killed = admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'edgeloop-events' AND query LIKE 'LISTEN%%'").fetchall()
    assert len(killed) == 2  # both routers' listeners
    # Each notifier hears None ("re-read"): notifications sent meanwhile were lost.
    got = {inbox_a.next() for _ in range(3)}
    assert got == {("rounds", None), ("targets", None), ("devices", None)} and link.reconnects == 1
    assert b.links[0].wait_listening(WAIT_S)
    b.notifiers["rounds"].notify({"round_id": "after"})
    assert inbox_a.next() == ("rounds", {"round_id": "after"})
    assert RESYNC == "*"
