"""Shared fixtures: real databases (SQLite file, and PostgreSQL when reachable) and a real
server context with migrations applied."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

POSTGRES_ADMIN_URL = os.environ.get("EDGELOOP_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def _postgres_available() -> bool:
    try:
        import psycopg
        from sqlalchemy.engine import make_url

        url = make_url(POSTGRES_ADMIN_URL)
        with psycopg.connect(host=url.host, port=url.port or 5432, user=url.username, dbname=url.database,
                             password=url.password, connect_timeout=3):
            return True
    except Exception:  # noqa: BLE001
        return False


_PG = None


def postgres_available() -> bool:
    global _PG
    if _PG is None:
        _PG = _postgres_available()
    return _PG


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test, dropped afterwards."""
    if not postgres_available():
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}")
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}")
    import psycopg
    from sqlalchemy.engine import make_url

    admin = make_url(POSTGRES_ADMIN_URL)
    name = f"edgeloop_test_{uuid.uuid4().hex[:12]}"
    kw = dict(host=admin.host, port=admin.port or 5432, user=admin.username, password=admin.password, autocommit=True)
    with psycopg.connect(dbname=admin.database, **kw) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(dbname=admin.database, **kw) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """Each database test runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'edgeloop.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def server_settings(tmp_path, db_url):
    from server.settings import ServerSettings

    return ServerSettings(
        data_dir=tmp_path / "server", database_url=db_url, model_kind="mlp", input_shape="1,28,28",
        num_classes=10, heartbeat_interval_s=0.5, watch_keepalive_s=0.5, worker_poll_s=0.1,
        # Auth tests refuse hundreds of tokens from one TestClient; the limit on failed REST
        # authentications has its own test (tests/server/test_rest_auth.py) that turns it on.
        rest_auth_fail_rate_per_s=0,
    )


@pytest.fixture
def server_ctx(server_settings):
    from server.context import ServerContext

    ctx = ServerContext.open(server_settings)
    yield ctx
    ctx.close()


# --- small models and real datasets ---------------------------------------------------------


@pytest.fixture(scope="module")
def one_thread():
    """torch on one intra-op thread for a module's tests and its module-scoped fixtures: on two
    shared cores more threads only add contention for these small models. Opt in per module
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def digits():
    """UCI hand-written digits (1x8x8 uint8 images, 10 classes) from ``shared.data``."""
    from shared.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def fashion_mnist():
    """Fashion-MNIST (1x28x28 uint8 images, 10 classes) from ``shared.data``."""
    from shared.data import load_dataset

    return load_dataset("fashion-mnist")


# --- waiting on real processes (e2e tests) ---------------------------------------------------


@pytest.fixture
def wait_until():
    """``wait_until(condition, timeout, what, procs=())``: poll ``condition`` until it returns
    something truthy and return that; fail naming ``what`` after ``timeout`` seconds, or as
    soon as one of ``procs`` (``subprocess.Popen``) exits. A bounded poll of a condition, for
    state that only another process can change (no event crosses the process boundary)."""
    import time

    def wait(condition, timeout: float, what: str, procs=()):
        deadline = time.monotonic() + timeout
        while True:
            for p in procs:
                if p.poll() is not None:
                    pytest.fail(f"process {p.args[:4]} exited with {p.returncode} while waiting for {what}")
            value = condition()
            if value:
                return value
            if time.monotonic() >= deadline:
                pytest.fail(f"timed out after {timeout} s waiting for {what}")
            time.sleep(0.1)

    return wait


@pytest.fixture
def processes():
    """A list to append started ``subprocess.Popen`` objects to; each still running at teardown
    gets SIGTERM, then SIGKILL if it has not exited 20 s later."""
    import subprocess

    from edgeloop.fleet import stop_processes

    procs: list[subprocess.Popen] = []
    yield procs
    stop_processes(procs, timeout_s=20)


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a process that takes a port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def client(server_ctx):
    """The REST API of ``server_ctx`` through Starlette's in-process TestClient (real routing,
    middleware and database; no socket), sending the first-start admin token."""
    import warnings

    from server.api.main import create_app
    from server.domain.operators import read_bootstrap_token

    with warnings.catch_warnings():  # starlette warns that its TestClient prefers httpx2
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient

    app = create_app(server_ctx)  # creates the admin token on first start
    token = read_bootstrap_token(server_ctx.settings.data_dir)
    return TestClient(app, raise_server_exceptions=True, headers={"Authorization": f"Bearer {token}"})
