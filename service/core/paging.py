"""Cursor pages of rows: the rows after a cursor in the list's order, and whether another page follows.

Ids are time-ordered strings (service.core.db.models.new_id), so a page is "ids below the cursor, newest first";
no offsets, and rows inserted meanwhile never shift a page. (The HTTP form, `?limit=&after=<id>` answered by
`{"data": [...], "has_more": bool}`, is service.http.pagination.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy import Select
from sqlalchemy.orm import InstrumentedAttribute, Session

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    items: Sequence[T]
    has_more: bool


def page(
    session: Session,
    stmt: Select[Any],
    id_column: InstrumentedAttribute[Any],
    limit: int,
    after: Any | None,
    *,
    ascending: bool = False,
) -> Page[Any]:
    """One page of `stmt`'s rows: after the cursor in the list's order, one extra row fetched to know whether
    another page follows."""
    if after is not None:
        stmt = stmt.where(id_column > after if ascending else id_column < after)
    stmt = stmt.order_by(id_column.asc() if ascending else id_column.desc()).limit(limit + 1)
    rows = session.scalars(stmt).all()
    return Page(rows[:limit], len(rows) > limit)
