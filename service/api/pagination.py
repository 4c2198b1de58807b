"""Cursor pagination: `?limit=&after=<id>` → `{"data": [...], "has_more": bool}`.

Ids are time-ordered strings (service.db.models.new_id), so a page is "ids below the cursor, newest first";
no offsets, and rows inserted meanwhile never shift a page.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

DEFAULT_LIMIT = 20
MAX_LIMIT = 100

T = TypeVar("T")


def page(
    session: Session,
    stmt: Select,
    id_column: InstrumentedAttribute,
    limit: int,
    after: Any | None,
    *,
    ascending: bool = False,
) -> tuple[Sequence[Any], bool]:
    """(rows, has_more) of one page: rows after the cursor in the list's order, one extra row fetched to
    know whether another page follows."""
    if after is not None:
        stmt = stmt.where(id_column > after if ascending else id_column < after)
    stmt = stmt.order_by(id_column.asc() if ascending else id_column.desc()).limit(limit + 1)
    rows = session.scalars(stmt).all()
    return rows[:limit], len(rows) > limit
