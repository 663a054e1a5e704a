"""The audit log, for the data protection officer: who accessed what, when (admin scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from sqlalchemy import select

from service.api.deps import DbSession, admin_scope
from service.api.pagination import MAX_LIMIT, SortKey, next_cursor, paginate
from service.api.problems import responses
from service.api.queries import utc
from service.api.schemas import AuditOut, IsoDateTime, Page
from service.core.models import AuditEvent

router = APIRouter(prefix="/api/v1", tags=["audit"], dependencies=[Depends(admin_scope)])
_SORTS = {"id": SortKey(AuditEvent.id, "int")}


@router.get(
    "/audit", response_model=Page[AuditOut], summary="Audit events, newest first", responses=responses(400)
)
def list_audit(
    session: DbSession,
    principal: Annotated[str | None, Query(max_length=160)] = None,
    resource_prefix: Annotated[
        str | None, Query(max_length=512, description="Path prefix, e.g. a study URL.")
    ] = None,
    at_from: Annotated[IsoDateTime | None, Query(description="At or after (ISO 8601).")] = None,
    at_to: Annotated[IsoDateTime | None, Query(description="Before (ISO 8601).")] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 100,
) -> Page[AuditOut]:
    stmt = select(AuditEvent)
    if principal is not None:
        stmt = stmt.where(AuditEvent.principal == principal)
    if resource_prefix is not None:
        escaped = resource_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        stmt = stmt.where(AuditEvent.resource.like(escaped + "%", escape="\\"))
    if at_from is not None:
        stmt = stmt.where(AuditEvent.at >= utc(at_from))
    if at_to is not None:
        stmt = stmt.where(AuditEvent.at < utc(at_to))
    stmt, _, _ = paginate(stmt, sort="-id", keys=_SORTS, id_col=AuditEvent.id, cursor=cursor, limit=limit)
    rows = list(session.scalars(stmt))
    return Page[AuditOut](
        items=[AuditOut.model_validate(e, from_attributes=True) for e in rows[:limit]],
        next_cursor=next_cursor(rows, limit, "-id", lambda e: e.id, lambda e: e.id),
        limit=limit,
    )
