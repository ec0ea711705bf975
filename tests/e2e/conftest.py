"""Real server and agent processes on loopback for the end-to-end tests (``processes``,
``wait_until`` and ``free_port`` come from tests/conftest.py)."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import subprocess
import sys
from dataclasses import dataclass

import httpx
import pytest

from edgeloop.fleet import create_enrollment_token
from server.domain.operators import read_bootstrap_token

EDGELOOP = [sys.executable, "-m", "edgeloop"]
# A small plain MLP on the digits dataset (1x8x8, 10 classes): trains in seconds.
DIGITS_SERVER_ENV = {"EDGELOOP_MODEL_KIND": "mlp", "EDGELOOP_INPUT_SHAPE": "1,8,8",
                     "EDGELOOP_NUM_CLASSES": "10", "EDGELOOP_DRESS_SPARSITIES": "",
                     "EDGELOOP_FSYNC": "false"}


@dataclass(frozen=True)
class ServerProcess:
    proc: subprocess.Popen
    rest_port: int
    grpc_port: int
    ca_file: str | None = None  # the server's local CA (TLS on, as users run it); None: insecure
    enrollment_token: str = ""  # issued at start for the agents of the test (start_agent presents it)
    operator_token: str = ""  # the first-start admin token (<data_dir>/operator-token); api() sends it

    @property
    def api_url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://127.0.0.1:{self.rest_port}/api/v1"

    def api(self, **kw) -> httpx.Client:
        """A REST client of this server that verifies it against its CA and sends the admin token."""
        verify = ssl.create_default_context(cafile=self.ca_file) if self.ca_file else True
        auth = {"Authorization": f"Bearer {self.operator_token}"} if self.operator_token else {}
        return httpx.Client(base_url=self.api_url, verify=verify, **{"timeout": 30, "headers": auth, **kw})

    @property
    def agent_pin(self) -> list[str]:
        """``edgeloop agent run`` options that pin this server's CA."""
        return ["--ca-file", self.ca_file] if self.ca_file else ["--insecure"]

    @property
    def grpc_address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"


@pytest.fixture
def start_server(tmp_path, processes, wait_until):
    """``start_server(**env)``: ``edgeloop server run`` on free ports with the digits MLP
    settings (``env`` overrides or adds ``EDGELOOP_*`` variables); returns once it is ready."""

    def start(**env: str) -> ServerProcess:
        ready = tmp_path / "server.ready.json"
        proc = subprocess.Popen(
            [*EDGELOOP, "server", "run", "--data-dir", str(tmp_path / "server"), "--rest-port", "0",
             "--grpc-port", "0", "--ready-file", str(ready)],
            env={**os.environ, **DIGITS_SERVER_ENV, **env}, stdout=sys.stderr, stderr=sys.stderr,
            start_new_session=True)
        processes.append(proc)
        wait_until(ready.exists, 60, "the server to start", [proc])
        ports = json.loads(ready.read_text())
        db_url = {**DIGITS_SERVER_ENV, **env}.get("EDGELOOP_DATABASE_URL") or \
            f"sqlite:///{(tmp_path / 'server' / 'edgeloop.db').resolve()}"
        token = create_enrollment_token(db_url, name="e2e", max_uses=100)
        return ServerProcess(proc, ports["rest_port"], ports["grpc_port"], ports.get("ca_file"), token,
                             read_bootstrap_token(tmp_path / "server"))

    return start


@pytest.fixture
def start_agent(tmp_path, processes):
    """``start_agent(server, name, samples=, status_port=, **env)``: ``edgeloop agent run``
    streaming ``samples`` labelled digits as fast as it can, without battery or load budgets."""

    def start(server: ServerProcess, name: str, *, samples: int, status_port: int,
              **env: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [*EDGELOOP, "agent", "run", "--server", server.grpc_address,
             "--data-dir", str(tmp_path / name), "--name", name, "--dataset", "digits",
             "--max-samples", str(samples), "--rate-per-s", "0", "--status-port", str(status_port),
             *server.agent_pin],
            env={**os.environ, "EDGELOOP_AGENT_BATTERY": "false", "EDGELOOP_AGENT_LOAD_BUDGET": "false",
                 "EDGELOOP_AGENT_ENROLLMENT_TOKEN": server.enrollment_token, **env},
            stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
        processes.append(proc)
        return proc

    return start


@pytest.fixture
def agent_http():
    """``agent_http(port, method, path, body=None) -> (status, json)``: the agent's local
    status endpoint (GET /status, PUT /budget)."""

    def call(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        try:
            data = None if body is None else json.dumps(body)
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    return call
