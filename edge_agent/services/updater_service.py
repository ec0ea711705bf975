"""The updater service: when the server names a version other than the one running, drive the
:class:`~edge_agent.update_machine.UpdateMachine` to it (download, verify, install, probation,
commit or roll back). A failed update is retried with backoff (a different target starts at
once); an interrupted download resumes from its part file; a version this device rolled back
is ignored until the server names another one."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from edge_agent.backoff import Backoff
from edge_agent.connection import Connection
from edge_agent.update_machine import UpdateMachine
from edge_agent.update_state import WORKING, State

log = logging.getLogger(__name__)


class UpdaterService:
    name = "updater"

    def __init__(self, conn: Connection, machine: UpdateMachine, running_hash: Callable[[], str], *,
                 retry: Backoff, link_backoff: Backoff, poll_s: float = 1.0) -> None:
        self.conn = conn
        self.machine = machine
        self._running_hash = running_hash
        self.poll_s = poll_s  # also re-checks without a target change (a retry falling due)
        self.retry = retry  # after a failed update
        self.link_backoff = link_backoff  # after an interrupted download
        self._next_try = 0.0
        self._failed_target = ""  # the target _next_try holds back after a failure
        self._ignored = ""  # the rolled-back target last logged as ignored

    def interrupt(self) -> None:
        self.conn.target_changed.set()

    def run(self, stop: threading.Event) -> None:
        # Work a crash left (probation, a rollback) needs no network: finish it first.
        self.machine.run(None)
        while not stop.is_set():
            self.conn.target_changed.clear()
            self.tick()
            delay = max(0.0, min(self.poll_s, self._next_try - time.monotonic())) or self.poll_s
            self.conn.target_changed.wait(delay)

    def tick(self) -> State:
        """One look at the target; runs an update to it if one is due."""
        target = self.conn.target if self.conn.registered else ""
        m = self.machine
        if m.state in WORKING:  # suspended (download interrupted, rollback retried) or resumed
            if time.monotonic() >= self._next_try and (target or m.state is not State.DOWNLOADING):
                return self._after(m.run(target or None))
            return m.state
        if not target or target == self._running_hash():
            return m.state
        if target == self._failed_target and time.monotonic() < self._next_try:
            return m.state  # retried once its backoff is over; another target starts at once
        report = m.rejected(target)
        if report is not None:
            if self._ignored != target:
                log.warning("ignoring target %s: rolled back here (%s)", target[:12], report.reason)
                self._ignored = target
            return m.state
        m.start(target)
        return self._after(m.run(target))

    def _after(self, state: State) -> State:
        now = time.monotonic()
        reason = self.machine.record.reason
        if state is State.DOWNLOADING:  # suspended: the link dropped (or the server said wait)
            hold = getattr(self.conn.client, "retry_after", None)
            self._next_try = now + max(self.link_backoff.next_delay(), hold.remaining() if hold else 0.0)
        elif state is State.ROLLING_BACK:  # the rollback could not finish: retry it
            self.conn.report_error(reason)
            self._next_try = now + self.retry.next_delay()
        elif state is State.FAILED:
            log.error("update failed, keeping model %s: %s", self._running_hash()[:12] or "none", reason)
            self.conn.report_error(reason)
            self._next_try = now + self.retry.next_delay()
            self._failed_target = self.machine.record.target_hash
        else:
            self.link_backoff.reset()
            if state is State.ROLLED_BACK:
                self.conn.report_error(f"rolled back {self.machine.record.target_hash[:12]}: {reason}")
            elif state is State.COMMITTED:
                self.retry.reset()
                self.conn.clear_error()
        return state
