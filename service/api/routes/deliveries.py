"""Deliveries of results to PACS: state per object and destination, re-send."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api.deps import DbSession, read_scope, write_scope
from service.api.pagination import MAX_LIMIT, SortKey, next_cursor, paginate, sort_pattern
from service.api.problems import ProblemError, not_found, responses
from service.api.schemas import UID_PATTERN, DeliveryOut, DestinationOut, Page
from service.core.logs import ctx
from service.core.models import Delivery, DeliveryState
from service.core.outbox import reset_for_resend
from service.core.queue import enqueue_delivery

log = logging.getLogger("lusai.api")
router = APIRouter(prefix="/api/v1", tags=["deliveries"])
DeliveryId = Annotated[int, Path(ge=1, le=2**62, description="Delivery ID")]
_SORTS = {"created_at": SortKey(Delivery.created_at, "datetime"), "id": SortKey(Delivery.id, "int")}


def _out(d: Delivery) -> DeliveryOut:
    return DeliveryOut.model_validate(d, from_attributes=True)


@router.get(
    "/deliveries",
    response_model=Page[DeliveryOut],
    summary="List deliveries",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_deliveries(
    session: DbSession,
    state: DeliveryState | None = None,
    destination: Annotated[str | None, Query(max_length=128, description="AET@host:port")] = None,
    sop_instance_uid: Annotated[
        str | None, Query(pattern=UID_PATTERN, max_length=64, description="UID of the delivered SEG/SR/SC.")
    ] = None,
    result_id: Annotated[int | None, Query(ge=1, le=2**62)] = None,
    sort: Annotated[str, Query(pattern=sort_pattern(list(_SORTS)))] = "-id",
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> Page[DeliveryOut]:
    stmt = select(Delivery)
    if state is not None:
        stmt = stmt.where(Delivery.state == state)
    if destination is not None:
        stmt = stmt.where(Delivery.destination == destination)
    if sop_instance_uid is not None:
        stmt = stmt.where(Delivery.sop_instance_uid == sop_instance_uid)
    if result_id is not None:
        stmt = stmt.where(Delivery.result_id == result_id)
    stmt, _, _ = paginate(stmt, sort=sort, keys=_SORTS, id_col=Delivery.id, cursor=cursor, limit=limit)
    rows = list(session.scalars(stmt))
    attr = sort.lstrip("-")
    return Page[DeliveryOut](
        items=[_out(d) for d in rows[:limit]],
        next_cursor=next_cursor(rows, limit, sort, lambda d: getattr(d, attr), lambda d: d.id),
        limit=limit,
    )


@router.get(
    "/destinations",
    response_model=list[DestinationOut],
    summary="Delivery counts by destination and state",
    dependencies=[Depends(read_scope)],
    responses=responses(),
)
def destinations(session: DbSession) -> list[DestinationOut]:
    counts: dict[str, dict[str, int]] = {}
    last_at: dict[str, datetime] = {}
    for dest, state, n, last in session.execute(
        select(Delivery.destination, Delivery.state, func.count(), func.max(Delivery.delivered_at)).group_by(
            Delivery.destination, Delivery.state
        )
    ):
        counts.setdefault(dest, {})[state.value] = n
        if last is not None and (dest not in last_at or last > last_at[dest]):
            last_at[dest] = last
    ordered = sorted(counts.items())
    return [DestinationOut(destination=d, counts=c, last_delivered_at=last_at.get(d)) for d, c in ordered]


def _get(session: Session, delivery_id: int) -> Delivery:
    d = session.get(Delivery, delivery_id)
    if d is None:
        raise not_found("delivery")
    return d


@router.get(
    "/deliveries/{delivery_id}",
    response_model=DeliveryOut,
    summary="One delivery",
    dependencies=[Depends(read_scope)],
    responses=responses(404),
)
def get_delivery(delivery_id: DeliveryId, session: DbSession) -> DeliveryOut:
    return _out(_get(session, delivery_id))


@router.post(
    "/deliveries/{delivery_id}/resend",
    response_model=DeliveryOut,
    status_code=202,
    summary="Send the object to its destination again (also after it was delivered or gave up)",
    dependencies=[Depends(write_scope)],
    responses=responses(404, 409),
)
def resend(delivery_id: DeliveryId, session: DbSession) -> DeliveryOut:
    d = _get(session, delivery_id)
    if d.state == DeliveryState.SENDING:
        raise ProblemError(409, "delivery-in-progress", "the object is being sent right now")
    reset_for_resend(d)
    session.commit()
    try:
        enqueue_delivery(d.id)
    except Exception as exc:  # the outbox row is pending: the delivery sweep picks it up
        log.warning(
            "broker unavailable, delivery left pending", extra=ctx(delivery_id=d.id, error=type(exc).__name__)
        )
    return _out(d)
