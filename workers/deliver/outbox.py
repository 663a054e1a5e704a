"""Drain the delivery outbox: one attempt per call, exponential backoff, dead-letter after N.

Each Delivery row is independent, so a dead peer delays only its own rows and never blocks other
destinations (the failure mode of the MONAI gateway's single export loop).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from service.core.db import session_scope
from service.core.logs import ctx
from service.core.models import Delivery, DeliveryState
from service.core.settings import Destination, Settings
from service.core.storage import ObjectStore
from workers.deliver.dimse import DeliveryError, c_store

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 8
BASE_DELAY_S = 15.0
MAX_DELAY_S = 3600.0


def backoff(attempts: int) -> float:
    return float(min(MAX_DELAY_S, BASE_DELAY_S * 2 ** max(0, attempts - 1)))


def send_delivery(delivery_id: int, *, settings: Settings, store: ObjectStore) -> tuple[str, float | None]:
    """Try once; returns (outcome, seconds until the next try or None)."""
    with session_scope(settings.db_url) as session:
        d = session.get(Delivery, delivery_id)
        if d is None or d.state in (DeliveryState.DELIVERED, DeliveryState.DEAD):
            return "skipped", None
        d.state = DeliveryState.SENDING
        d.attempts += 1
        attempts, destination, key, uid = d.attempts, d.destination, d.storage_key, d.sop_instance_uid
    error: DeliveryError | None = None
    try:
        c_store(store.path(key), Destination.parse(destination), settings)
    except DeliveryError as exc:
        error = exc
    except (OSError, ValueError, RuntimeError) as exc:
        error = DeliveryError(f"{type(exc).__name__}: {exc}")
    now = datetime.now(UTC)
    with session_scope(settings.db_url) as session:
        d = session.get(Delivery, delivery_id)
        assert d is not None
        if error is None:
            d.state, d.delivered_at, d.last_error, d.next_attempt_at = (
                DeliveryState.DELIVERED,
                now,
                None,
                None,
            )
            log.info(
                "delivered", extra=ctx(delivery_id=delivery_id, sop_instance_uid=uid, destination=destination)
            )
            return "delivered", None
        d.last_error = str(error)[:2000]
        if error.permanent or attempts >= MAX_ATTEMPTS:
            d.state, d.next_attempt_at = DeliveryState.DEAD, None
            log.error(
                "delivery dead", extra=ctx(delivery_id=delivery_id, destination=destination, error=str(error))
            )
            return "dead", None
        delay = backoff(attempts)
        d.state, d.next_attempt_at = DeliveryState.RETRYING, now + timedelta(seconds=delay)
        log.warning(
            "delivery failed, will retry",
            extra=ctx(delivery_id=delivery_id, destination=destination, attempt=attempts, retry_in_s=delay),
        )
        return "retrying", delay
