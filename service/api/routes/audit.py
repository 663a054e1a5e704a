"""The audit log, for the data protection officer: who accessed what, when (admin scope)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.api.deps import DbSession, admin_scope
from service.api.pagination import Cursor, Limit, paginate
from service.api.problems import responses
from service.api.queries.audit import NEWEST, select_audit
from service.api.schemas import AuditFilter, AuditOut, Page

router = APIRouter(prefix="/api/v1", tags=["audit"], dependencies=[Depends(admin_scope)])


@router.get(
    "/audit", response_model=Page[AuditOut], summary="Audit events, newest first", responses=responses(400)
)
def list_audit(
    session: DbSession,
    filters: Annotated[AuditFilter, Query()],
    cursor: Cursor = None,
    limit: Limit = 100,
) -> Page[AuditOut]:
    page = paginate(session, select_audit(filters), cursor, limit, NEWEST)
    return Page[AuditOut](
        items=[AuditOut.model_validate(r.AuditEvent, from_attributes=True) for r in page.rows],
        next_cursor=page.next_cursor,
        limit=limit,
    )
