"""Everything a running server holds: settings, database, blobs, notifiers, worker."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from server.db import migrate
from server.db.engine import make_engine, make_session_factory, transaction
from server.domain.rounds import fail_interrupted
from server.domain.versions import ensure_initial_version
from server.events import EventRouter, open_router
from server.notifier import Notifier
from server.settings import ServerSettings
from server.signing import open_signing
from server.store.blobs import BlobStore

log = logging.getLogger(__name__)


@dataclass
class ServerContext:
    settings: ServerSettings
    engine: Engine
    factory: sessionmaker[Session]
    blobs: BlobStore
    # payloads (docs/scale.md): rounds_wakeup {"round_id"}; targets_changed {"round_id",
    # "device_ids" (None: any device may have moved)}; devices_changed {"device_id"}.
    rounds_wakeup: Notifier = field(default_factory=lambda: Notifier("rounds"))
    targets_changed: Notifier = field(default_factory=lambda: Notifier("targets"))
    devices_changed: Notifier = field(default_factory=lambda: Notifier("devices"))
    # Bridges the three notifiers to other processes (settings.event_bus; server/events).
    events: EventRouter | None = None

    @property
    def notifiers(self) -> dict[str, Notifier]:
        return {n.name: n for n in (self.rounds_wakeup, self.targets_changed, self.devices_changed)}

    @classmethod
    def open(cls, settings: ServerSettings, *, run_migrations: bool = True) -> ServerContext:
        """Connect, migrate, recover from a crash, and make sure version 0 exists."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.resolved_database_url)
        blobs = BlobStore(settings.data_dir / "blobs", fsync=settings.fsync)
        if run_migrations:
            migrate.upgrade(engine, blobs=blobs)  # data migrations may rewrite artefacts
        ctx = cls(settings, engine, make_session_factory(engine), blobs)
        open_signing(settings, ctx.factory)  # before anything publishes: every artefact is signed as added
        with transaction(ctx.factory) as s:
            # Only rounds whose worker is gone: other worker processes may be mid-round.
            n = fail_interrupted(s, stale_after_s=settings.worker_stale_s)
            if n:
                log.warning("marked %d interrupted rounds as failed", n)
            v0 = ensure_initial_version(s, ctx.blobs, settings.arch, settings.init_seed)
            log.info("fleet model %s (version %d)", v0.model_hash[:12], v0.number)
        try:
            ctx.events = open_router(ctx.notifiers, event_bus=settings.event_bus,
                                     database_url=settings.resolved_database_url)
        except Exception:
            ctx.engine.dispose()
            raise
        return ctx

    def close(self) -> None:
        if self.events is not None:
            self.events.close()
            self.events = None
        self.engine.dispose()
