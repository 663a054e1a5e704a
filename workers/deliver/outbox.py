"""Drain the delivery outbox: one attempt per call; the retry policy (backoff, dead-letter after N
attempts) is :mod:`service.core.lifecycle`'s.

Each Delivery row is independent, so a dead peer delays only its own rows and never blocks other
destinations (the failure mode of the MONAI gateway's single export loop).
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from service.core import lifecycle
from service.core.logs import ctx
from service.core.models import Delivery, DeliveryState
from service.core.runtime import Runtime
from service.core.settings import Destination
from workers.deliver.dimse import DeliveryError, c_store

log = logging.getLogger(__name__)


def send_delivery(delivery_id: int, *, runtime: Runtime) -> tuple[str, float | None]:
    """Try once; returns (outcome, seconds until the next try or None)."""
    with runtime.db.session() as session:
        if not lifecycle.start_sending(session, delivery_id):
            return "skipped", None
        d = session.get(Delivery, delivery_id)
        assert d is not None
        attempts, destination, key, uid = d.attempts, d.destination, d.storage_key, d.sop_instance_uid
    error: DeliveryError | None = None
    try:
        c_store(runtime.store.path(key), Destination.parse(destination), runtime.settings)
    except DeliveryError as exc:
        error = exc
    except (OSError, ValueError, RuntimeError) as exc:
        error = DeliveryError(f"{type(exc).__name__}: {exc}")
    with runtime.db.session() as session:
        if error is None:
            lifecycle.delivered(session, delivery_id)
            log.info(
                "delivered", extra=ctx(delivery_id=delivery_id, sop_instance_uid=uid, destination=destination)
            )
            return "delivered", None
        delay = lifecycle.fail_or_retry_delivery(session, delivery_id, str(error), permanent=error.permanent)
        if delay is not None:
            log.warning(
                "delivery failed, will retry",
                extra=ctx(
                    delivery_id=delivery_id, destination=destination, attempt=attempts, retry_in_s=delay
                ),
            )
            return "retrying", delay
        if session.scalar(select(Delivery.state).where(Delivery.id == delivery_id)) != DeliveryState.DEAD:
            return "skipped", None  # another sender took the row over meanwhile: it decides
        log.error(
            "delivery dead", extra=ctx(delivery_id=delivery_id, destination=destination, error=str(error))
        )
        return "dead", None
