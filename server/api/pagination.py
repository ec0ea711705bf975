"""The ``offset`` / ``limit`` query parameters every list route takes, bounded in one place.

Unbounded, an ``offset`` past 2**63 - 1 reached the database driver and failed there with an
``OverflowError`` (a 500); bounded, it is a 422 naming the limit, and the OpenAPI document
carries the same bounds (``maximum``) so clients and fuzzers see what the server accepts.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

MAX_OFFSET = 1_000_000_000  # far beyond any table here, far below every driver's integer range
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100


def offset_param(what: str) -> object:
    return Query(ge=0, le=MAX_OFFSET, description=f"{what} to skip (0 to {MAX_OFFSET}).")


def limit_param() -> object:
    return Query(ge=1, le=MAX_LIMIT, description=f"Page size (1 to {MAX_LIMIT}).")


LimitParam = Annotated[int, limit_param()]
DeviceOffset = Annotated[int, offset_param("Devices")]
SampleOffset = Annotated[int, offset_param("Samples")]
RoundOffset = Annotated[int, offset_param("Rounds")]
VersionOffset = Annotated[int, offset_param("Versions")]
TokenOffset = Annotated[int, offset_param("Tokens")]
AuditOffset = Annotated[int, offset_param("Events")]
