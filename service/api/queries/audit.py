"""The audit log, newest first."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select

from service.api.pagination import SortKey, Sorts
from service.api.queries.filters import equal, period
from service.api.schemas import AuditFilter
from service.core.models import AuditEvent

#: The only order: newest first.
NEWEST = Sorts({"id": SortKey(AuditEvent.id, "int")}, AuditEvent.id).order("-id")


def select_audit(f: AuditFilter) -> Select[*tuple[Any, ...]]:
    """Rows of (AuditEvent,); ``resource_prefix`` matches literally (LIKE wildcards escaped)."""
    stmt = select(AuditEvent).where(
        *equal(f, AuditEvent.principal), *period(AuditEvent.at, f.at_from, f.at_to)
    )
    if f.resource_prefix is not None:
        escaped = f.resource_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(AuditEvent.resource.like(escaped + "%", escape="\\"))
    return stmt
