"""Liveness (always open, for probes) and Prometheus metrics (a ``read`` token, or open with
``EDGELOOP_METRICS_PUBLIC=true`` for scrapers)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select, text

from server.api.deps import CtxDep, require_scope
from server.api.errors import responses
from server.api.routes.devices import ONLINE_HEARTBEATS
from server.api.schemas import HealthPublic
from server.context import ServerContext
from server.db.models import Device, ModelVersion, Round, Sample
from server.domain.rounds import TRANSITIONS

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])


def database_ok(ctx: ServerContext) -> bool:
    try:
        with ctx.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:  # noqa: BLE001 - any failure means "not ready"
        log.warning("database ping failed", exc_info=True)
        return False


@router.get("/healthz", response_model=HealthPublic, responses=responses(503))
def healthz(ctx: CtxDep) -> HealthPublic | JSONResponse:
    """200 with ``{"status": "ok", "database": "ok"}``; 503 if the database does not answer."""
    if database_ok(ctx):
        return HealthPublic(status="ok", database="ok")
    return JSONResponse(
        {"status": "error", "database": "unreachable", "detail": "database unreachable"}, status_code=503
    )


class FleetCollector(Collector):
    """Reads the fleet's figures from the database at scrape time (no state kept here, so
    several server processes report the same numbers)."""

    def __init__(self, ctx: ServerContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("edgeloop_database_up", "1 if the last scrape could read the database.")
        try:
            families = self._read()
        except Exception:  # noqa: BLE001 - a scrape must still answer when the DB is down
            log.warning("metrics: database read failed", exc_info=True)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list[Metric]:
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=ONLINE_HEARTBEATS * self.ctx.settings.heartbeat_interval_s)
        with self.ctx.factory() as s:
            devices = s.scalar(select(func.count()).select_from(Device)) or 0
            revoked = s.scalar(select(func.count()).select_from(Device).where(Device.revoked.is_(True))) or 0
            seen = s.scalars(select(Device.last_seen_at).where(Device.revoked.is_(False), Device.last_seen_at.is_not(None)))
            # Compared in Python: SQLite returns naive UTC datetimes, PostgreSQL aware ones.
            online = sum(1 for t in seen if (t if t.tzinfo else t.replace(tzinfo=timezone.utc)) >= cutoff)
            labelled = s.scalar(select(func.count()).select_from(Sample).where(Sample.label.is_not(None))) or 0
            unlabelled = s.scalar(select(func.count()).select_from(Sample).where(Sample.label.is_(None))) or 0
            by_status = dict(s.execute(select(Round.status, func.count()).group_by(Round.status)).all())
            versions = s.scalar(select(func.count()).select_from(ModelVersion)) or 0
            latest = s.scalar(select(func.max(ModelVersion.number)))

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        samples = GaugeMetricFamily("edgeloop_samples", "Stored samples.", labels=["labelled"])
        samples.add_metric(["true"], labelled)
        samples.add_metric(["false"], unlabelled)
        rounds = GaugeMetricFamily("edgeloop_rounds", "Rounds by status.", labels=["status"])
        for status in TRANSITIONS:  # every status, zeros included, so series never vanish
            rounds.add_metric([status], by_status.get(status, 0))
        return [
            gauge("edgeloop_devices", "Registered devices (revoked included).", devices),
            gauge("edgeloop_devices_revoked", "Revoked devices.", revoked),
            gauge("edgeloop_devices_online", f"Devices heard from within {ONLINE_HEARTBEATS} heartbeat intervals.", online),
            samples,
            rounds,
            gauge("edgeloop_model_versions", "Published model versions.", versions),
            gauge("edgeloop_latest_model_version", "Number of the newest model version (-1: none).",
                  -1 if latest is None else latest),
        ]


def metrics_registry(ctx: ServerContext) -> CollectorRegistry:
    """A registry per app (not the global one), so several apps in one process don't clash."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FleetCollector(ctx))
    return registry


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}},
    # A read token, unless metrics_public opens it for scrapers on a trusted network.
    dependencies=[require_scope("read", open_if=lambda settings: settings.metrics_public)],
)
def metrics(request: Request) -> Response:
    """Fleet gauges in Prometheus text format: devices (total, online, revoked), samples by
    labelled, rounds by status, model versions."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
