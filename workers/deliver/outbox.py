"""Drain the delivery outbox: one attempt per call; the retry policy (backoff, dead-letter after N
attempts) is :mod:`service.core.lifecycle`'s.

A dead peer delays only its own rows and never blocks other destinations (the failure mode of the
MONAI gateway's single export loop). Within one destination the outputs of a study keep their
order: a delivery behind an older one of its study waits, and each delivery that ends releases
the next (:func:`service.core.lifecycle.wait_in_line`). A peer that takes an object is back:
its other retrying deliveries are sent at once instead of when their backoff runs out.

Each destination has its transport: C-STORE (:mod:`workers.deliver.dimse`) for ``AET@host:port``,
STOW-RS (:mod:`workers.deliver.stow`) for a DICOMweb URL. Both raise the same
:class:`~workers.deliver.dimse.DeliveryError`, so everything above holds for both.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core import lifecycle
from service.core.logs import ctx
from service.core.models import Delivery, DeliveryState
from service.core.runtime import Runtime
from service.core.settings import Destination, Settings
from workers.deliver.dimse import DeliveryError, c_echo, c_store
from workers.deliver.stow import RetryLater, stow_rs, web_echo

log = logging.getLogger(__name__)


def _send(path: Path, destination: Destination, settings: Settings) -> None:
    """One attempt over the destination's transport; raises :class:`DeliveryError` on failure."""
    if destination.transport == "stowrs":
        stow_rs(path, destination, settings)
    else:
        c_store(path, destination, settings)


def _echo(destination: Destination, settings: Settings) -> None:
    """Whether the destination answers: C-ECHO, or for DICOMweb a cheap QIDO-RS GET."""
    if destination.transport == "stowrs":
        web_echo(destination, settings)
    else:
        c_echo(destination, settings)


def probe_destinations(runtime: Runtime) -> int:
    """A recovery-sweep step: C-ECHO each destination whose deliveries wait for a retry (a GET of
    a DICOMweb one); one that answers is back, and its retries are sent now. Returns how many were
    woken.

    Without it, a destination that comes back while nothing else is sent to it gets each
    delivery only when that delivery's backoff runs out (up to an hour after the outage).
    A destination that refuses C-ECHO (a DICOMweb one that answers 5xx, 408 or 429) is left to
    the backoff, as before.
    """
    with runtime.db.session() as session:
        sleeping = lifecycle.sleeping_destinations(session)
    woken = 0
    for destination in sleeping:
        try:
            _echo(Destination.parse(destination), runtime.settings)
        except (DeliveryError, OSError, ValueError, RuntimeError):
            continue
        with runtime.db.session() as session:
            ids = lifecycle.wake_destination(session, destination)
        for delivery_id in ids:
            runtime.queue.enqueue_delivery(delivery_id)
        if ids:
            log.info(
                "destination answers again: retries sent now",
                extra=ctx(destination=destination, count=len(ids)),
            )
        woken += len(ids)
    return woken


def send_delivery(delivery_id: int, *, runtime: Runtime) -> tuple[str, float | None]:
    """Try once; returns (outcome, seconds until the next try or None)."""
    with runtime.db.session() as session:
        if lifecycle.wait_in_line(session, delivery_id):
            return "waiting", None
        if not lifecycle.start_sending(session, delivery_id):
            return "skipped", None
        d = session.get(Delivery, delivery_id)
        assert d is not None
        attempts, destination, key, uid = d.attempts, d.destination, d.storage_key, d.sop_instance_uid
    error: DeliveryError | None = None
    try:
        _send(runtime.store.path(key), Destination.parse(destination), runtime.settings)
    except DeliveryError as exc:
        error = exc
    except (OSError, ValueError, RuntimeError) as exc:
        error = DeliveryError(f"{type(exc).__name__}: {exc}")
    with runtime.db.session() as session:
        outcome, delay, follow = _record(session, delivery_id, uid, destination, attempts, error)
    for next_id in follow:  # after the commit: released from waiting, or woken up
        try:
            runtime.queue.enqueue_delivery(next_id)
        except Exception as exc:  # the row is PENDING or due: the recovery sweep sends it
            log.warning("broker unavailable", extra=ctx(delivery_id=next_id, error=type(exc).__name__))
    return outcome, delay


def _record(
    session: Session,
    delivery_id: int,
    uid: str,
    destination: str,
    attempts: int,
    error: DeliveryError | None,
) -> tuple[str, float | None, list[int]]:
    """Record the attempt's outcome: (outcome, seconds until the next try, deliveries to send next)."""
    if error is None:
        follow: list[int] = []
        if lifecycle.delivered(session, delivery_id):
            follow = lifecycle.release_next(session, delivery_id)
            follow += lifecycle.wake_destination(session, destination)
        log.info(
            "delivered", extra=ctx(delivery_id=delivery_id, sop_instance_uid=uid, destination=destination)
        )
        return "delivered", None, follow
    # A server that said when to come back (Retry-After) is not asked again before.
    wait = error.retry_after if isinstance(error, RetryLater) else 0.0
    delay = lifecycle.fail_or_retry_delivery(
        session, delivery_id, str(error), permanent=error.permanent, not_before=wait
    )
    if delay is not None:
        log.warning(
            "delivery failed, will retry",
            extra=ctx(delivery_id=delivery_id, destination=destination, attempt=attempts, retry_in_s=delay),
        )
        return "retrying", delay, []
    if session.scalar(select(Delivery.state).where(Delivery.id == delivery_id)) != DeliveryState.DEAD:
        return "skipped", None, []  # another sender took the row over meanwhile: it decides
    log.error("delivery dead", extra=ctx(delivery_id=delivery_id, destination=destination, error=str(error)))
    return "dead", None, lifecycle.release_next(session, delivery_id)
