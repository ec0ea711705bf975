"""Fixtures of the server tests: a running gRPC fleet server per test (tests/server/grpc_fleet.py)."""

from __future__ import annotations

import pytest

from tests.server.grpc_fleet import Fleet


@pytest.fixture
def fleet_factory(server_ctx):
    started: list[Fleet] = []

    def start(**overrides) -> Fleet:
        f = Fleet(server_ctx, **overrides)
        started.append(f)
        return f

    yield start
    for f in started:
        f.close()


@pytest.fixture
def fleet(fleet_factory) -> Fleet:
    return fleet_factory()
