"""deploy/grafana: the dashboard is Grafana-shaped and every metric (and label value) it queries
exists in a real server's /metrics (EdgeLoopServer on a real port, TLS, a read token)."""

from __future__ import annotations

import json
import re
import ssl
from pathlib import Path

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

GRAFANA = Path(__file__).resolve().parent.parent / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "edgeloop-fleet.json"
# A metric selector: name, optional {label matchers}; PromQL functions and keywords are not
# edgeloop_ names, so only our series match.
SELECTOR = re.compile(r"\b(edgeloop_[a-zA-Z0-9_]+)\s*(\{[^}]*\})?")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!=|!~|=)\s*"([^"]*)"')


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _exprs(dash: dict) -> list[str]:
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]


def test_dashboard_is_grafana_shaped() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    assert [v["name"] for v in dash["templating"]["list"] if v["type"] == "datasource"] == ["datasource"]
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and len(ids) >= 6
    for p in dash["panels"]:
        assert p["type"] in {"stat", "timeseries", "gauge", "bargauge", "table"} and p["title"]
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert refs and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert SELECTOR.search(t["expr"]), f"{p['title']}: {t['expr']!r} queries no edgeloop metric"
            assert t["expr"].count("(") == t["expr"].count(")")


def test_provisioning_points_at_the_dashboards() -> None:
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "edgeloop.yaml").read_text())
    assert dashboards["apiVersion"] == 1 and dashboards["providers"][0]["type"] == "file"
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    scrape = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
    job = scrape["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["authorization"]["type"] == "Bearer"


@pytest.fixture
def metrics_text(tmp_path) -> str:
    """/metrics of a real server (TLS, its local CA) read with a read token made over REST."""
    from server.app import EdgeLoopServer
    from server.domain.operators import read_bootstrap_token
    from server.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "server", database_url=f"sqlite:///{tmp_path / 'g.db'}",
                              rest_port=0, grpc_port=0, embedded_worker=False)
    server = EdgeLoopServer(settings)
    server.start()
    try:
        assert server.tls is not None and server.tls.ca_file is not None
        verify = ssl.create_default_context(cafile=str(server.tls.ca_file))
        base = f"https://127.0.0.1:{server.rest_port}"
        admin = {"Authorization": f"Bearer {read_bootstrap_token(settings.data_dir)}"}
        with httpx.Client(base_url=base, verify=verify, timeout=30) as client:
            assert client.get("/metrics").status_code == 401  # a scraper needs a token
            made = client.post("/api/v1/tokens", json={"name": "prometheus", "scope": "read"}, headers=admin)
            assert made.status_code == 201, made.text
            resp = client.get("/metrics", headers={"Authorization": f"Bearer {made.json()['token']}"})
            assert resp.status_code == 200
            return resp.text
    finally:
        server.stop()


def test_every_queried_metric_exists_in_metrics(metrics_text: str) -> None:
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            samples.setdefault(s.name, []).append(s.labels)
    queried = [(m.group(1), m.group(2) or "") for e in _exprs(_dashboard()) for m in SELECTOR.finditer(e)]
    assert queried
    for name, matchers in queried:
        assert name in samples, f"the dashboard queries {name}, which /metrics does not serve"
        for label, op, value in MATCHER.findall(matchers):
            assert op == "=", f"{name}: only exact matchers are checked, got {op}"
            assert any(s.get(label) == value for s in samples[name]), \
                f"{name}{{{label}={value!r}}}: no such series in /metrics"
