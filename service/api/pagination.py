"""Keyset (cursor) pagination: stable under concurrent inserts and as fast on page 1000 as page 1.

A cursor is base64url JSON of the sort name and the last row's (sort value, id); it is opaque to
clients and checked against the requested sort, so a cursor from another query is a 400.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.sql.elements import SQLCoreOperations

from service.api.problems import ProblemError

MAX_LIMIT = 500
S = TypeVar("S", bound=Select)


@dataclass(frozen=True)
class SortKey:
    """One sortable column: ``expr`` must be non-null (wrap nullable columns in coalesce)."""

    expr: SQLCoreOperations[Any]
    kind: Literal["int", "float", "str", "datetime"]


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
    stmt: S,
    *,
    sort: str,
    keys: dict[str, SortKey],
    id_col: SQLCoreOperations[Any],
    cursor: str | None,
    limit: int,
) -> tuple[S, SortKey, bool]:
    """Order, seek past the cursor and fetch ``limit + 1`` rows (the extra one says 'more')."""
    desc = sort.startswith("-")
    key = keys[sort.lstrip("-")]
    if cursor:
        value, last_id = decode_cursor(cursor, sort, key.kind)
        if desc:
            stmt = stmt.where(or_(key.expr < value, and_(key.expr == value, id_col < last_id)))
        else:
            stmt = stmt.where(or_(key.expr > value, and_(key.expr == value, id_col > last_id)))
    order = (key.expr.desc(), id_col.desc()) if desc else (key.expr.asc(), id_col.asc())
    return stmt.order_by(*order).limit(limit + 1), key, desc


def next_cursor(rows: Sequence[Any], limit: int, sort: str, value_of: Any, id_of: Any) -> str | None:
    if len(rows) <= limit:
        return None
    last = rows[limit - 1]
    return encode_cursor(sort, value_of(last), id_of(last))


def sort_pattern(names: Sequence[str]) -> str:
    return "^-?(" + "|".join(names) + ")$"
