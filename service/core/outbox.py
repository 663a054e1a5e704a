"""Outbox queries shared by the recovery sweep and the tools."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from service.core.models import Delivery, DeliveryState

#: A delivery whose retry time passed this long ago lost its countdown message (broker restart).
LOST_AFTER = timedelta(minutes=5)


def reset_for_resend(delivery: Delivery, now: datetime | None = None) -> None:
    """A fresh attempt budget, due now: what the CLI and the API mean by "re-send"."""
    delivery.state = DeliveryState.PENDING
    delivery.attempts = 0
    delivery.next_attempt_at = now or datetime.now(UTC)
    delivery.last_error = None


def lost_deliveries(session: Session, now: datetime | None = None) -> list[int]:
    """Pending/retrying deliveries that should have been attempted by now but were not."""
    now = now or datetime.now(UTC)
    created_before = now - LOST_AFTER
    return list(
        session.scalars(
            select(Delivery.id).where(
                or_(
                    (Delivery.state == DeliveryState.PENDING) & (Delivery.created_at < created_before),
                    (Delivery.state == DeliveryState.RETRYING) & (Delivery.next_attempt_at < created_before),
                    (Delivery.state == DeliveryState.SENDING)
                    & (Delivery.created_at < now - timedelta(hours=1)),
                )
            )
        )
    )
