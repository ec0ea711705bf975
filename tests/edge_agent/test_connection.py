"""The agent's shared view of the server's target: a stale heartbeat answer never undoes a
newer word from the watch stream."""

from __future__ import annotations

from edge_agent.client import FleetClient
from edge_agent.connection import Connection
from edge_agent.settings import AgentSettings

OLD, NEW = "a" * 64, "b" * 64


def _conn(tmp_path) -> Connection:
    settings = AgentSettings(server="127.0.0.1:9", data_dir=tmp_path, status_port=-1)
    return Connection(settings, FleetClient(settings.server, timeout_s=1.0))


def test_a_heartbeat_answer_older_than_a_watch_push_is_dropped(tmp_path) -> None:
    conn = _conn(tmp_path)
    conn.set_target(OLD)
    epoch = conn.target_epoch()  # a heartbeat leaves; the server answers from before a publish
    conn.set_target(NEW)  # meanwhile the watch stream names the published version
    conn.target_changed.clear()
    assert conn.set_target(OLD, if_epoch=epoch) is False
    assert conn.target == NEW and not conn.target_changed.is_set()


def test_a_heartbeat_answer_is_taken_when_nothing_newer_arrived(tmp_path) -> None:
    conn = _conn(tmp_path)
    conn.set_target(OLD)
    conn.target_changed.clear()
    epoch = conn.target_epoch()
    assert conn.set_target(NEW, if_epoch=epoch) is True
    assert conn.target == NEW and conn.target_changed.is_set()
    # The same answer again (no change) is taken without waking the updater.
    conn.target_changed.clear()
    assert conn.set_target(NEW, if_epoch=conn.target_epoch()) is True
    assert not conn.target_changed.is_set()
