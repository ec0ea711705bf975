"""A real local fleet for the browser tests (one per module: starting it is most of the cost)
and a headless Debian chromium driven by Playwright, never a downloaded browser.

The server runs as users run it (TLS with its fresh CA, first-start admin token); sim-0 uploads
labelled digits, sim-1 unlabelled ones (something to label in the console)."""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from edgeloop.fleet import create_enrollment_token, stop_processes
from server.domain.operators import read_bootstrap_token
from tests.e2e.conftest import DIGITS_SERVER_ENV, EDGELOOP

CHROMIUM = "/usr/bin/chromium"
# Offline and quiet: no GPU, no sandbox (containers), no update or sync traffic, no QUIC.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
ARTIFACTS = Path(os.environ.get("EDGELOOP_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts")) / "console"
AGENT_SAMPLES = 120


@dataclass
class Fleet:
    server: subprocess.Popen
    agents: list[subprocess.Popen]
    base: str  # https://127.0.0.1:<port>
    ca_file: str
    admin_token: str

    def api(self, token: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=self.base + "/api/v1", timeout=30,
                            verify=ssl.create_default_context(cafile=self.ca_file),
                            headers={"Authorization": f"Bearer {token or self.admin_token}"})

    def check_alive(self) -> None:
        for p in [self.server, *self.agents]:
            if p.poll() is not None:
                pytest.fail(f"{p.args[:5]} exited with {p.returncode}")

    def wait(self, condition, timeout: float, what: str):  # type: ignore[no-untyped-def]
        """Polls ``condition`` (state another process changes) until truthy, failing fast if one dies."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.2)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory) -> Iterator[Fleet]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} is missing: scripts/install.sh installs Debian's chromium (as root) with the dev extra")
    work = tmp_path_factory.mktemp("console-fleet")
    ready = work / "server.ready.json"
    procs: list[subprocess.Popen] = []
    env = {**os.environ, **DIGITS_SERVER_ENV, "EDGELOOP_HEARTBEAT_INTERVAL_S": "1"}
    server = subprocess.Popen(
        [*EDGELOOP, "server", "run", "--data-dir", str(work / "server"), "--rest-port", "0", "--grpc-port", "0",
         "--ready-file", str(ready)], env=env, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True)
    procs.append(server)
    try:
        deadline = time.monotonic() + 90
        while not ready.exists():
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the server did not start")
            time.sleep(0.1)
        ports = json.loads(ready.read_text())
        enrol = create_enrollment_token(f"sqlite:///{(work / 'server' / 'edgeloop.db').resolve()}",
                                        name="console test", max_uses=10)
        agents = []
        for i, labels in enumerate(("true", "false")):
            agents.append(subprocess.Popen(
                [*EDGELOOP, "agent", "run", "--server", f"127.0.0.1:{ports['grpc_port']}", "--ca-file", ports["ca_file"],
                 "--data-dir", str(work / f"agent-{i}"), "--name", f"sim-{i}", "--tags", f"sim,site-{i}",
                 "--dataset", "digits", "--shard-index", str(i), "--num-shards", "2",
                 "--max-samples", str(AGENT_SAMPLES), "--rate-per-s", "0", "--status-port", "-1"],
                env={**os.environ, "EDGELOOP_AGENT_BATTERY": "false", "EDGELOOP_AGENT_LOAD_BUDGET": "false",
                     "EDGELOOP_AGENT_ENROLLMENT_TOKEN": enrol, "EDGELOOP_AGENT_SEND_LABELS": labels},
                stdout=sys.stderr, stderr=sys.stderr, start_new_session=True))
        procs.extend(agents)
        f = Fleet(server, agents, f"https://127.0.0.1:{ports['rest_port']}", ports["ca_file"],
                  read_bootstrap_token(work / "server"))
        with f.api() as c:
            # Both agents registered, reporting a model, and enough samples for a round.
            f.wait(lambda: len([d for d in c.get("/devices").json()["data"] if d["model_hash"]]) == 2, 90,
                   "both agents to register and report their model")
            f.wait(lambda: (lambda n: n["labelled"] >= 60 and n["unlabelled"] >= 10)(c.get("/samples/counts").json()),
                   90, "labelled and unlabelled samples")
        yield f
    finally:
        stop_processes(procs, timeout_s=20)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page_for(browser, fleet):
    """``page_for(token)``: a fresh browser context (its own sessionStorage) signed in to the console."""
    contexts = []

    def open_page(token: str):  # type: ignore[no-untyped-def]
        ctx = browser.new_context(ignore_https_errors=True, viewport={"width": 1400, "height": 1000})
        ctx.set_default_timeout(60_000)  # generous for loaded CI machines; every wait ends on its condition
        contexts.append(ctx)
        page = ctx.new_page()
        # Uncaught exceptions and console errors (CSP violations among them) fail the tests; a
        # refused API call is recorded apart, as (status, path), for the test to check.
        page.errors, page.refused = [], []
        page.on("pageerror", lambda e: page.errors.append(str(e)))
        page.on("console", lambda m: page.errors.append(m.text)
                if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
        page.on("response", lambda r: page.refused.append((r.status, urlsplit(r.url).path)) if r.status >= 400 else None)
        page.goto(fleet.base + "/ui/")
        page.fill("#token", token)
        page.click("#login button[type=submit]")
        page.wait_for_selector("#whoami")
        return page

    yield open_page
    for ctx in contexts:
        ctx.close()


def shot(page, name: str) -> Path:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
