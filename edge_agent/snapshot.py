"""Read-only views of a running agent: heartbeat metrics, the local /status document, and the
HeartbeatRequest. Assembled here from each service's own report, so no service reads another's
internals."""

from __future__ import annotations

from typing import TYPE_CHECKING

from protos.edgeloop.v1 import fleet_pb2 as pb

if TYPE_CHECKING:
    from edge_agent.daemon import Agent

MAX_REPORTED_ROLLBACKS = 16  # per heartbeat; the server keeps its own bounded history


def metrics(agent: Agent) -> dict[str, float]:
    runner, stats = agent.runner, agent.fetcher.stats
    summary = agent.predictions.summary()
    m = {
        "predictions": float(summary.get("count", 0)),
        **agent.uploader.metrics(),
        "bytes_downloaded": float(stats.bytes_downloaded),
        "artefacts_installed": float(stats.artefacts_installed),
        "update_failures": float(stats.failures),
        "rollbacks": float(len(agent.machine.record.rollbacks)),
        "local_labelled": float(len(agent.local_data)),
        "source_exhausted": float(bool(getattr(agent.source, "exhausted", False))),
    }
    acc = agent.predictions.accuracy(runner.model_hash) if runner.model_hash else None
    if acc is not None:
        m["accuracy"] = float(acc)
    recent = agent.machine.scores.get(runner.model_hash)  # probation's score on local labels
    if recent is not None:
        m["recent_accuracy"] = recent
    m.update(agent.governor.metrics())
    if agent.learner is not None:
        m.update(agent.learner.metrics())
    if getattr(agent, "domains", None) is not None:  # learner=da3: switches, domains stored
        m.update(agent.domains.metrics())
    m["active_subnet"] = float(runner.active_subnet)  # what runs, not what was decided
    return m


def status(agent: Agent) -> dict:
    conn = agent.conn
    update = agent.machine.status()
    return {
        "device_id": conn.identity.device_id if conn.identity else None,
        "server": agent.settings.server,
        "connected": conn.connected,
        "model_hash": agent.runner.model_hash,
        "target_model_hash": conn.target,
        "update_state": update["state"],
        "update": update,
        "last_error": conn.last_error,
        "metrics": metrics(agent),
        "predictions": agent.predictions.summary(),
        "runner": agent.runner.describe(),
        **agent.governor.status(),
        "learner": agent.learner.status() if agent.learner is not None else None,
    }


def heartbeat_request(agent: Agent) -> pb.HeartbeatRequest:
    budget = {k: v for k, v in agent.governor.current_budget().to_dict().items() if v is not None}
    record = agent.machine.record
    return pb.HeartbeatRequest(
        model_hash=agent.runner.model_hash, active_subnet=agent.runner.active_subnet,
        budget=pb.Budget(**budget), metrics=metrics(agent), state=record.state.value,
        last_error=agent.conn.last_error, samples_pending=len(agent.queue),
        rollbacks=[pb.UpdateReport(model_hash=r.model_hash, reason=r.reason, at_ms=r.at_ms)
                   for r in record.rollbacks[-MAX_REPORTED_ROLLBACKS:]],
    )
