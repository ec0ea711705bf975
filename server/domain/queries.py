"""SQL building blocks for lists that scale (issue 12): filters evaluated by the database and
pages cut by it (``COUNT`` for the total, ``OFFSET``/``LIMIT`` for the rows), so no list
request reads a whole table into Python.

Tags are a JSON array column. The database tests membership: PostgreSQL with the JSONB
containment operator (``tags::jsonb @> '["x"]'``), SQLite with its JSON1 table function
(``EXISTS (SELECT 1 FROM json_each(tags) WHERE value = 'x')``). Either is a scan of the
devices table inside the database (no index on array elements: docs/scale.md), which at
100,000 devices is tens of milliseconds and streams nothing to the server.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, Select, cast, func, literal, select
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Session


def has_tag(session: Session, column: Any, tag: str) -> ColumnElement[bool]:
    """``column`` (a JSON array of strings) holds ``tag``, as SQL for this session's database."""
    if session.get_bind().dialect.name == "postgresql":
        return cast(column, JSONB).contains([tag])
    elements = func.json_each(column).table_valued("value", joins_implicitly=True)
    return select(literal(1)).select_from(elements).where(elements.c.value == tag).exists()


def count(session: Session, entity: Any, *where: ColumnElement[bool]) -> int:
    """``SELECT COUNT(*)`` of ``entity``'s rows matching ``where``."""
    return int(session.scalar(select(func.count()).select_from(entity).where(*where)) or 0)


def page(session: Session, query: Select, *, offset: int, limit: int) -> list:
    """The rows of ``query`` (which must be ordered, on a unique key last, for pages to be
    stable) from ``offset``, at most ``limit`` of them."""
    return list(session.scalars(query.offset(offset).limit(limit)))
