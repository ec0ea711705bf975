"""The agent's services: one job, one thread each, started and guarded by
:class:`edge_agent.daemon.Agent` (the supervisor).

A service has a ``name`` and ``run(stop)``, which returns once ``stop`` is set; ``interrupt()``
(optional) unblocks a wait that ``stop`` alone would not end (a stream, an event).
"""

from __future__ import annotations

import threading
from typing import Protocol


class Service(Protocol):
    name: str

    def run(self, stop: threading.Event) -> None: ...
