"""Deliveries: the list, one delivery by id, and the counts per destination."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from service.api.pagination import SortKey, Sorts
from service.api.queries import found
from service.api.queries.filters import equal
from service.api.schemas import DeliveryFilter, DeliveryOut, DestinationOut
from service.core.models import Delivery

SORTS = Sorts(
    {"created_at": SortKey(Delivery.created_at, "datetime"), "id": SortKey(Delivery.id, "int")}, Delivery.id
)


def select_deliveries(f: DeliveryFilter) -> Select[*tuple[Any, ...]]:
    """Rows of (Delivery,)."""
    return select(Delivery).where(
        *equal(f, Delivery.state, Delivery.destination, Delivery.sop_instance_uid, Delivery.result_id)
    )


def delivery_by_id(session: Session, delivery_id: int) -> Delivery:
    return found(session.get(Delivery, delivery_id), "delivery")


def destination_counts(session: Session) -> list[DestinationOut]:
    """Deliveries by destination and state, and when each destination last took one, by name."""
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


def delivery_out(d: Delivery) -> DeliveryOut:
    return DeliveryOut.model_validate(d, from_attributes=True)
