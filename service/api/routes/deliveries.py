"""Deliveries of results to PACS: state per object and destination, re-send."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from service.api.deps import AppRuntime, DbSession, read_scope, write_scope
from service.api.pagination import Cursor, Limit, paginate
from service.api.problems import ProblemError, responses
from service.api.queries.deliveries import (
    SORTS,
    delivery_by_id,
    delivery_out,
    destination_counts,
    select_deliveries,
)
from service.api.schemas import DeliveryFilter, DeliveryOut, DestinationOut, Page
from service.core import lifecycle
from service.core.logs import ctx

log = logging.getLogger("lusai.api")
router = APIRouter(prefix="/api/v1", tags=["deliveries"])
DeliveryId = Annotated[int, Path(ge=1, le=2**62, description="Delivery ID")]


@router.get(
    "/deliveries",
    response_model=Page[DeliveryOut],
    summary="List deliveries",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_deliveries(
    session: DbSession,
    filters: Annotated[DeliveryFilter, Query()],
    sort: Annotated[str, Query(pattern=SORTS.pattern)] = "-id",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[DeliveryOut]:
    page = paginate(session, select_deliveries(filters), cursor, limit, SORTS.order(sort))
    return Page[DeliveryOut](
        items=[delivery_out(r.Delivery) for r in page.rows], next_cursor=page.next_cursor, limit=limit
    )


@router.get(
    "/destinations",
    response_model=list[DestinationOut],
    summary="Delivery counts by destination and state",
    dependencies=[Depends(read_scope)],
    responses=responses(),
)
def destinations(session: DbSession) -> list[DestinationOut]:
    return destination_counts(session)


@router.get(
    "/deliveries/{delivery_id}",
    response_model=DeliveryOut,
    summary="One delivery",
    dependencies=[Depends(read_scope)],
    responses=responses(404),
)
def get_delivery(delivery_id: DeliveryId, session: DbSession) -> DeliveryOut:
    return delivery_out(delivery_by_id(session, delivery_id))


@router.post(
    "/deliveries/{delivery_id}/resend",
    response_model=DeliveryOut,
    status_code=202,
    summary="Send the object to its destination again (also after it was delivered or gave up)",
    dependencies=[Depends(write_scope)],
    responses=responses(404, 409),
)
def resend(delivery_id: DeliveryId, session: DbSession, runtime: AppRuntime) -> DeliveryOut:
    d = delivery_by_id(session, delivery_id)
    if not lifecycle.resend(session, d.id):  # refused only while it is being sent
        raise ProblemError(409, "delivery-in-progress", "the object is being sent right now")
    session.commit()
    try:
        runtime.queue.enqueue_delivery(d.id)
    except Exception as exc:  # the outbox row is pending: the delivery sweep picks it up
        log.warning(
            "broker unavailable, delivery left pending", extra=ctx(delivery_id=d.id, error=type(exc).__name__)
        )
    return delivery_out(d)
