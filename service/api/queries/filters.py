"""Conditions from optional query parameters: a parameter left out (None) adds no condition."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from sqlalchemy import ColumnElement
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import SQLColumnExpression

Column = SQLColumnExpression[Any]


def utc(value: datetime) -> datetime:
    """Filter timestamps in UTC: naive ones are taken as UTC (SQLite compares them as text)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def equal(f: BaseModel, *columns: QueryableAttribute[Any]) -> list[ColumnElement[bool]]:
    """``column = value`` for each column whose filter was given: a list filter's field is named as
    the column it compares (``InstanceFilter.patient_id`` is ``Study.patient_id``)."""
    return [col == value for col in columns if (value := getattr(f, col.key)) is not None]


def between(col: Column, low: object, high: object) -> list[ColumnElement[bool]]:
    """``low <= column <= high``, each bound only where given."""
    return ([col >= low] if low is not None else []) + ([col <= high] if high is not None else [])


def period(col: Column, start: datetime | None, end: datetime | None) -> list[ColumnElement[bool]]:
    """At or after ``start`` and before ``end``, in UTC; each bound only where given."""
    return ([col >= utc(start)] if start is not None else []) + ([col < utc(end)] if end is not None else [])
