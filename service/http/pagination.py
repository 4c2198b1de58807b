"""Cursor pagination over HTTP: `?limit=&after=<id>` → `{"data": [...], "has_more": bool}`, the bounds of
`limit`; the pages themselves are service.core.paging's."""

from __future__ import annotations

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
