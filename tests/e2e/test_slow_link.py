"""An agent behind a rate-limited link that breaks mid-download still ends on the new version,
resuming where it stopped rather than starting over."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edge_agent.model_store import ModelStore
from tests.e2e.netns import create_link, destroy_link, netns_supported

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not netns_supported(), reason="needs root, ip and tc")]


def _wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_agent_resumes_download_after_link_cut(tmp_path: Path) -> None:
    link = create_link(rate="3mbit")
    server = agent = None
    try:
        ready = tmp_path / "ready.json"
        env = {**os.environ, "EDGELOOP_GRPC_HOST": link.host_ip, "EDGELOOP_HEARTBEAT_INTERVAL_S": "1",
               "EDGELOOP_CHUNK_BYTES": "65536"}

        def start_server(rest_port: int = 0, grpc_port: int = 0) -> subprocess.Popen:
            ready.unlink(missing_ok=True)
            return subprocess.Popen(
                [sys.executable, "-m", "edgeloop", "server", "run", "--data-dir", str(tmp_path / "srv"),
                 "--rest-port", str(rest_port), "--grpc-port", str(grpc_port), "--ready-file", str(ready)], env=env)

        server = start_server()
        ports = _wait(lambda: ready.exists() and json.loads(ready.read_text()), 60, "server")
        agent_log = tmp_path / "agent.log"
        with agent_log.open("wb") as log_fh:
            agent = subprocess.Popen(
                [*link.exec_prefix(), sys.executable, "-m", "edgeloop", "agent", "run",
                 "--server", f"{link.host_ip}:{ports['grpc_port']}", "--data-dir", str(tmp_path / "agent"),
                 "--dataset", "fashion-mnist", "--max-samples", "50", "--status-port", "-1"],
                stdout=log_fh, stderr=subprocess.STDOUT,
                env={**os.environ, "EDGELOOP_AGENT_BACKOFF_MAX_S": "2", "EDGELOOP_AGENT_CHUNK_BYTES": "65536"})
        # Version 0 (2.7 MB at 3 Mbit/s takes ~7 s): break things while it downloads.
        _wait(lambda: b"downloading" in agent_log.read_bytes(), 60, "the download to start")
        time.sleep(1.5)
        link.set_up(False)  # a short outage: TCP rides it out
        time.sleep(3.0)
        link.set_up(True)
        time.sleep(1.0)
        server.kill()  # the server dies mid-stream: the agent must resume, not restart
        server.wait()
        time.sleep(2.0)
        server = start_server(ports["rest_port"], ports["grpc_port"])
        _wait(lambda: ready.exists(), 60, "the server to restart")
        api = httpx.Client(base_url=f"http://127.0.0.1:{ports['rest_port']}/api/v1")
        v0 = api.get("/models").json()["data"][0]["model_hash"]
        store = ModelStore(tmp_path / "agent" / "models")
        _wait(lambda: store.current_hash() == v0, 120, "the agent to install version 0")
        text = agent_log.read_text(errors="replace")
        resumed = [int(m) for m in re.findall(r"from byte (\d+)", text)]
        assert any(off > 0 for off in resumed), f"download never resumed: {resumed}\n{text[-3000:]}"
        assert store.current() is not None  # verifies the model hash from disk
        devices = api.get("/devices").json()["data"]
        assert _wait(lambda: api.get(f"/devices/{devices[0]['id']}").json()["model_hash"] == v0, 30, "heartbeat")
    finally:
        for p in (agent, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        destroy_link(link)
