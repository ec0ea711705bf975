"""An agent behind a rate-limited link that breaks mid-download still ends on the new version,
resuming where it stopped rather than starting over."""

from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from edge_agent.model_store import ModelStore
from edgeloop.fleet import create_enrollment_token
from server.domain.operators import read_bootstrap_token
from tests.e2e.netns import create_link, destroy_link, netns_supported

pytestmark = [pytest.mark.netns, pytest.mark.skipif(not netns_supported(), reason="needs root, ip and tc")]


OUTAGE_S = 3.0  # the stimulus: a link outage well inside TCP's retransmission give-up time


def _part_bytes(agent_dir: Path) -> int:
    """Bytes of the artefact the agent has received so far (its ``*.part`` download files)."""
    total = 0
    for part in agent_dir.rglob("*.part"):
        try:
            total += part.stat().st_size
        except FileNotFoundError:  # finalised (renamed) between listing and stat
            pass
    return total


def test_agent_resumes_download_after_link_cut(tmp_path: Path, wait_until) -> None:
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
        ports = wait_until(lambda: ready.exists() and json.loads(ready.read_text()), 60, "server")
        token = create_enrollment_token(f"sqlite:///{(tmp_path / 'srv' / 'edgeloop.db').resolve()}",
                                        name="slow link", max_uses=1)
        agent_log = tmp_path / "agent.log"
        with agent_log.open("wb") as log_fh:
            agent = subprocess.Popen(
                [*link.exec_prefix(), sys.executable, "-m", "edgeloop", "agent", "run",
                 "--server", f"{link.host_ip}:{ports['grpc_port']}", "--data-dir", str(tmp_path / "agent"),
                 "--dataset", "fashion-mnist", "--max-samples", "50", "--status-port", "-1",
                 "--ca-file", ports["ca_file"]],  # the server certificate lists the bind address
                stdout=log_fh, stderr=subprocess.STDOUT,
                env={**os.environ, "EDGELOOP_AGENT_BACKOFF_MAX_S": "2", "EDGELOOP_AGENT_CHUNK_BYTES": "65536",
                     "EDGELOOP_AGENT_ENROLLMENT_TOKEN": token})
        # Version 0 (2.7 MB at 3 Mbit/s takes ~7 s): break things while it downloads.
        agent_dir = tmp_path / "agent"
        wait_until(lambda: _part_bytes(agent_dir) > 0, 60, "the first bytes of version 0", [agent])
        link.set_up(False)  # a short outage: TCP rides it out
        cut_at = _part_bytes(agent_dir)
        time.sleep(OUTAGE_S)
        link.set_up(True)
        wait_until(lambda: _part_bytes(agent_dir) > cut_at, 60,
                   "the download to go on after the outage", [agent])
        server.kill()  # the server dies mid-stream: the agent must resume, not restart
        server.wait()
        server = start_server(ports["rest_port"], ports["grpc_port"])
        wait_until(lambda: ready.exists(), 60, "the server to restart", [server])
        api = httpx.Client(base_url=f"https://127.0.0.1:{ports['rest_port']}/api/v1",
                           verify=ssl.create_default_context(cafile=ports["ca_file"]),
                           headers={"Authorization": f"Bearer {read_bootstrap_token(tmp_path / 'srv')}"})
        v0 = api.get("/models").json()["data"][0]["model_hash"]
        store = ModelStore(tmp_path / "agent" / "models")
        wait_until(lambda: store.current_hash() == v0, 120, "the agent to install version 0", [agent])
        text = agent_log.read_text(errors="replace")
        resumed = [int(m) for m in re.findall(r"from byte (\d+)", text)]
        assert any(off > 0 for off in resumed), f"download never resumed: {resumed}\n{text[-3000:]}"
        assert store.current() is not None  # verifies the model hash from disk
        devices = api.get("/devices").json()["data"]
        assert wait_until(lambda: api.get(f"/devices/{devices[0]['id']}").json()["model_hash"] == v0, 30,
                          "heartbeat")
    finally:
        for p in (agent, server):
            if p is not None and p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()
        destroy_link(link)
