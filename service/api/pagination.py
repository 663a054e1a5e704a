"""Keyset (cursor) pagination: stable under concurrent inserts and as fast on page 1000 as page 1.

A cursor is base64url JSON of the sort name and the last row's (sort value, id); it is opaque to
clients and checked against the requested sort, so a cursor from another query is a 400. Every list
endpoint pages through :func:`paginate`.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Query
from sqlalchemy import Connection, Row, Select, and_, or_
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import SQLColumnExpression

from service.api.problems import ProblemError

MAX_LIMIT = 500
#: The query parameters every list takes besides its sort (default page sizes differ per list).
Cursor = Annotated[str | None, Query(max_length=512)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]

# Labels of the two columns paginate adds: the cursor is read from them, whatever the statement selects.
_VALUE, _ID = "page_value", "page_id"


@dataclass(frozen=True)
class SortKey:
    """One sortable column: ``expr`` must be non-null (wrap nullable columns in coalesce)."""

    expr: SQLColumnExpression[Any]
    kind: Literal["int", "float", "str", "datetime"]


@dataclass(frozen=True)
class Order:
    """One requested order: ``sort`` as the client named it ("-" first: descending)."""

    sort: str
    key: SortKey
    id_col: SQLColumnExpression[Any]

    @property
    def desc(self) -> bool:
        return self.sort.startswith("-")


@dataclass(frozen=True)
class Sorts:
    """The orders a list offers; ``id_col`` breaks ties, so the order is total and a cursor exact."""

    keys: Mapping[str, SortKey]
    id_col: SQLColumnExpression[Any]

    @property
    def pattern(self) -> str:
        """The regex of the ``sort`` query parameter: a key name, optionally after "-"."""
        return "^-?(" + "|".join(self.keys) + ")$"

    def order(self, sort: str) -> Order:
        return Order(sort, self.keys[sort.lstrip("-")], self.id_col)


@dataclass(frozen=True)
class Slice:
    """One page of rows and the cursor of the next (None: this is the last page).

    Each row holds the statement's columns (read them by name, e.g. ``row.Job``, ``row.version``)
    and, after them, the two columns the cursor was read from.
    """

    rows: Sequence[Row[Any]]
    next_cursor: str | None


def _encode_value(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _decode_value(value: Any, kind: str) -> Any:
    if kind == "datetime":
        if not isinstance(value, str):
            raise ValueError
        return datetime.fromisoformat(value)
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return value
    if kind == "str" and isinstance(value, str):
        return value
    raise ValueError


def encode_cursor(sort: str, value: Any, row_id: int) -> str:
    raw = json.dumps([sort, _encode_value(value), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, sort: str, kind: str) -> tuple[Any, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        name, value, row_id = json.loads(raw)
        if name != sort or not isinstance(row_id, int) or isinstance(row_id, bool):
            raise ValueError
        return _decode_value(value, kind), row_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ProblemError(
            400, "invalid-cursor", "cursor is malformed or belongs to another sort order"
        ) from None


def paginate(
    db: Session | Connection, stmt: Select[*tuple[Any, ...]], cursor: str | None, limit: int, order: Order
) -> Slice:
    """Seek past ``cursor`` in ``order`` and fetch one page of ``stmt`` (``limit + 1`` rows: the extra
    one says there is a next page).

    ``db`` is the session; a statement of plain columns may run on its connection instead, which
    returns the same rows without the ORM's per-row work.
    """
    key, id_col = order.key, order.id_col
    if cursor:
        value, last_id = decode_cursor(cursor, order.sort, key.kind)
        if order.desc:
            stmt = stmt.where(or_(key.expr < value, and_(key.expr == value, id_col < last_id)))
        else:
            stmt = stmt.where(or_(key.expr > value, and_(key.expr == value, id_col > last_id)))
    by = (key.expr.desc(), id_col.desc()) if order.desc else (key.expr.asc(), id_col.asc())
    stmt = stmt.add_columns(key.expr.label(_VALUE), id_col.label(_ID)).order_by(*by).limit(limit + 1)
    rows = db.execute(stmt).all()
    if len(rows) <= limit:
        return Slice(rows, None)
    last = rows[limit - 1]
    return Slice(rows[:limit], encode_cursor(order.sort, last[-2], last[-1]))
