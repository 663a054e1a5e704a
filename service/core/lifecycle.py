"""The job and delivery state machines: every change of a Job's or a Delivery's state is made here.

Each transition is one ``UPDATE ... WHERE id = :id AND state IN (:allowed)`` and returns whether it
won (the row changed), so two workers, the API and the recovery sweep can race without a lock and
the loser knows it lost. The caller owns the transaction: it passes its Session and commits.
Timestamps, attempt counts and errors are written here and nowhere else.

Jobs (``new_job`` and ``rerun`` create QUEUED ones)::

    claim            QUEUED, RETRYING          -> RUNNING      attempts + 1
                     (RUNNING under a dead worker's name, when the caller names it)
    succeed          QUEUED, RUNNING, RETRYING, SUCCEEDED -> SUCCEEDED
    fail             RUNNING                   -> FAILED
    fail_or_retry    RUNNING                   -> RETRYING     (FAILED on the last attempt)
    retry_when_space RUNNING                   -> RETRYING     attempt given back (FAILED after a day)
    cancel           QUEUED, RUNNING, RETRYING -> CANCELLED
    requeue_stale    RUNNING for too long      -> QUEUED       (FAILED on the last attempt)
    requeue_lost_workers RUNNING, its worker lost -> QUEUED    (FAILED on the last attempt)

A worker that ends its attempt passes the :class:`Attempt` its claim made: succeed, fail,
fail_or_retry and retry_when_space then win only while the job is still RUNNING under that very
claim, so a worker that was declared lost and comes back (a network restored) finds its job
re-queued or claimed again and its outcome is discarded: one result per job, whoever finishes.

Deliveries (``upsert_delivery`` creates PENDING ones)::

    wait_in_line            PENDING, RETRYING          -> WAITING     (an older one of its study is in line)
    start_sending           PENDING, RETRYING (due), SENDING -> SENDING     attempts + 1
    delivered               SENDING                    -> DELIVERED
    fail_or_retry_delivery  SENDING                    -> RETRYING    (DEAD: permanent, last attempt)
    release_next            WAITING (head of its line) -> PENDING     (after DELIVERED or DEAD)
    wake_destination        RETRYING                   -> due now     (its destination took one)
    resend                  all but SENDING            -> PENDING     attempts = 0

The outputs of one study reach a destination in the order they were made (their IDs): a
delivery with an older one of the same study and destination still in line waits, and each
delivery that ends (delivered or dead) releases the next. A viewer or a PACS rule that keeps
the latest object of a study then keeps the latest analysis, also after an outage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, func, or_, select, update
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.util import identity_key

from service.core.logs import ctx
from service.core.models import Delivery, DeliveryState, Job, JobState, Worker

log = logging.getLogger(__name__)

#: A job in one of these states will still run: re-run refuses, cancel accepts, recovery watches.
ACTIVE_JOB_STATES = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)
TERMINAL_JOB_STATES = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)
TERMINAL_DELIVERY_STATES = (DeliveryState.DELIVERED, DeliveryState.DEAD)
#: A delivery in one of these states holds its place in its study's line to its destination.
IN_LINE_DELIVERY_STATES = (
    DeliveryState.PENDING,
    DeliveryState.SENDING,
    DeliveryState.RETRYING,
    DeliveryState.WAITING,
)

#: Attempts before a delivery is dead-lettered (jobs take theirs from ``LUSAI_JOB_MAX_ATTEMPTS``).
#: With :data:`DELIVERY_BACKOFF` the last one comes about 4 h after the first: a PACS down for an
#: hour or two (a restart, maintenance) gets everything once it is back (8 attempts gave 32 min).
DELIVERY_MAX_ATTEMPTS = 12
#: A pending or retrying delivery this far past its due time lost its message (broker restart).
DELIVERY_LOST_AFTER = timedelta(minutes=5)
#: A delivery still "sending" this long after it was created lost its worker.
DELIVERY_SENDING_LOST_AFTER = timedelta(hours=1)
#: A retry's countdown message may arrive this much before its ``next_attempt_at`` (clocks differ).
DELIVERY_DUE_SLACK = timedelta(seconds=5)
#: Retrying deliveries made due at once when their destination has taken an object (per success).
WAKE_LIMIT = 200
#: Errors are kept for people to read, not as logs: the start is enough.
MAX_ERROR_CHARS = 2000


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff: ``base_s`` after the first failed attempt, doubling, at most ``cap_s``."""

    base_s: float
    cap_s: float

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        return float(min(self.cap_s, self.base_s * 2.0 ** min(max(0, attempt - 1), 64)))


JOB_BACKOFF = Backoff(base_s=10.0, cap_s=300.0)
#: A job that failed for want of disk space waits at most this long since it was made for room.
STORAGE_FULL_RETRY_FOR = timedelta(hours=24)
DELIVERY_BACKOFF = Backoff(base_s=15.0, cap_s=3600.0)


def db_now(session: Session) -> datetime:
    """The clock every transition uses (the database server's on PostgreSQL): see :func:`_now`."""
    return _now(session, None)


def _now(session: Session, now: datetime | None) -> datetime:
    """The time a transition stamps and compares: ``now`` when given, else the database server's.

    One clock for every process: staleness compares a stamp one host wrote with another host's
    "now", so a worker whose clock runs hours off (or jumps) must not make its jobs look stale
    or lost to the others' recovery sweeps. SQLite is embedded: one machine, its clock.
    """
    if now is not None:
        return now
    if session.get_bind().dialect.name == "postgresql":
        db_now = session.scalar(select(func.now()))
        if db_now is not None:
            return cast(datetime, db_now)
    return datetime.now(UTC)


def _move(
    session: Session,
    model: type[Job] | type[Delivery],
    row_id: int,
    allowed: Iterable[JobState] | Iterable[DeliveryState],
    values: Mapping[str, Any],
    *where: ColumnElement[bool],
) -> bool:
    """The one shape of every transition: a conditional UPDATE of one row; True when it changed.

    A copy of the row already loaded in ``session`` is expired, so it is read again from the
    database (never guessed in Python, which could show a transition that lost as won).
    """
    stmt = (
        update(model)
        .where(model.id == row_id, model.state.in_(list(allowed)), *where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    won = cast(CursorResult[Any], session.execute(stmt)).rowcount == 1
    loaded = session.identity_map.get(identity_key(model, row_id))
    if loaded is not None:
        session.expire(loaded)
    return won


# Jobs ---------------------------------------------------------------------------------------------


def new_job(session: Session, instance_id: int, *, model_version: str | None = None) -> Job:
    """A QUEUED job for an instance (flushed: it has its ID). Send it after the commit: :func:`enqueue`."""
    job = Job(instance_id=instance_id, state=JobState.QUEUED, attempts=0, model_version=model_version)
    session.add(job)
    session.flush()
    return job


def mark_enqueued(session: Session, job_id: int, *, now: datetime | None = None) -> bool:
    """Record that the broker has the job's message; only the first stamp counts.

    Any state: a fast worker may already have claimed (or finished) the job by now.
    """
    return _move(
        session, Job, job_id, JobState, {"enqueued_at": _now(session, now)}, Job.enqueued_at.is_(None)
    )


def enqueue(session: Session, job_id: int, send: Callable[[int], object]) -> bool:
    """Send a committed job to the broker, then stamp ``enqueued_at``; False if the broker is down.

    The row is the truth: a job the broker never got stays unstamped and the recovery sweep
    (:func:`requeue_stale`) sends it again. ``send`` is the producer's call
    (:meth:`service.core.queue.TaskQueue.enqueue_analysis` of the runtime's queue).
    """
    try:
        send(job_id)
    except Exception as exc:
        log.warning(
            "broker unavailable, job left for recovery", extra=ctx(job_id=job_id, error=type(exc).__name__)
        )
        return False
    mark_enqueued(session, job_id)
    return True


@dataclass(frozen=True)
class Attempt:
    """One claim of a job: the claiming process (``host:pid``) and the attempt number it made.

    The transitions that end an attempt take it and win only while the job is RUNNING under
    exactly this claim (:func:`attempt_of` reads it after :func:`claim` won).
    """

    worker: str
    number: int

    def holds(self) -> ColumnElement[bool]:
        return cast(
            ColumnElement[bool],
            (Job.state == JobState.RUNNING) & (Job.worker == self.worker) & (Job.attempts == self.number),
        )


def attempt_of(session: Session, job_id: int) -> Attempt | None:
    """The claim a RUNNING job is under now (call right after :func:`claim` won, same transaction)."""
    row = session.execute(
        select(Job.worker, Job.attempts).where(Job.id == job_id, Job.state == JobState.RUNNING)
    ).one_or_none()
    if row is None or row.worker is None:
        return None
    return Attempt(row.worker, row.attempts)


def claim(
    session: Session,
    job_id: int,
    worker: str,
    *,
    lost_worker: str | None = None,
    worker_name: str | None = None,
    now: datetime | None = None,
) -> bool:
    """QUEUED or RETRYING -> RUNNING, one attempt more; False: finished, cancelled, or another
    worker holds it.

    ``worker`` is the claiming process (``host:pid``), ``worker_name`` the registry's name of its
    worker (:mod:`service.core.registry`): should that worker be lost, :func:`requeue_lost_workers`
    puts the job back at once.

    ``lost_worker`` names a holder known to be dead (its process is gone: Celery redelivers the
    message of a killed pool process at once); a RUNNING job held by exactly that worker is taken
    over. Anything else RUNNING waits for :func:`requeue_stale`, so two live workers never run one
    job, and of two takers of a dead worker's job only the first matches.
    """
    held_by_lost = (Job.state != JobState.RUNNING) | (Job.worker == lost_worker)
    return _move(
        session,
        Job,
        job_id,
        (JobState.QUEUED, JobState.RETRYING, *((JobState.RUNNING,) if lost_worker else ())),
        {
            "state": JobState.RUNNING,
            "attempts": Job.attempts + 1,
            "started_at": _now(session, now),
            "worker": worker[:128],
            "worker_name": worker_name[:200] if worker_name else None,
            "error": None,
        },
        *((held_by_lost,) if lost_worker else ()),
    )


def succeed(
    session: Session,
    job_id: int,
    *,
    model_version: str,
    timings_ms: Mapping[str, float],
    attempt: Attempt | None = None,
    now: datetime | None = None,
) -> bool:
    """-> SUCCEEDED; False when the job was cancelled (or failed) meanwhile: keep nothing then.

    With ``attempt`` (a worker's), RUNNING under that claim only: False too when the job was
    re-queued or claimed again since (its worker was declared lost). Without, a job that already
    succeeded may succeed again: its outputs are deterministic, so a re-save rewrites the same objects.
    """
    allowed = (JobState.RUNNING,) if attempt else (*ACTIVE_JOB_STATES, JobState.SUCCEEDED)
    return _move(
        session,
        Job,
        job_id,
        allowed,
        {
            "state": JobState.SUCCEEDED,
            "finished_at": _now(session, now),
            "model_version": model_version,
            "timings_ms": {k: round(v, 1) for k, v in timings_ms.items()},
        },
        *_under(attempt),
    )


def _under(attempt: Attempt | None) -> tuple[ColumnElement[bool], ...]:
    return (attempt.holds(),) if attempt is not None else ()


def fail(
    session: Session,
    job_id: int,
    error: str,
    *,
    attempt: Attempt | None = None,
    now: datetime | None = None,
) -> bool:
    """RUNNING -> FAILED for good (unusable input, a model version this worker does not have);
    with ``attempt``, only while the job is under that claim."""
    values = {"state": JobState.FAILED, "error": error[:MAX_ERROR_CHARS], "finished_at": _now(session, now)}
    return _move(session, Job, job_id, (JobState.RUNNING,), values, *_under(attempt))


def fail_or_retry(
    session: Session,
    job_id: int,
    error: str,
    *,
    max_attempts: int,
    attempt: Attempt | None = None,
    now: datetime | None = None,
) -> float | None:
    """RUNNING -> RETRYING, returning the countdown (:data:`JOB_BACKOFF`) for the next attempt;
    or -> FAILED on the last attempt, returning None. None too when the job is no longer running
    (cancelled, or taken back by the recovery sweep) or, with ``attempt``, no longer under that
    claim: then there is nothing to schedule."""
    attempts = session.scalar(select(Job.attempts).where(Job.id == job_id))
    if attempts is None or (attempt is not None and attempt.number != attempts):
        return None
    now = _now(session, now)
    retry = attempts < max_attempts
    values: dict[str, Any] = {"error": error[:MAX_ERROR_CHARS]}
    if retry:
        values |= {"state": JobState.RETRYING, "enqueued_at": now}
    else:
        values |= {"state": JobState.FAILED, "finished_at": now}
    won = _move(session, Job, job_id, (JobState.RUNNING,), values, Job.attempts == attempts, *_under(attempt))
    return JOB_BACKOFF.delay(attempts) if won and retry else None


def retry_when_space(
    session: Session,
    job_id: int,
    error: str,
    *,
    attempt: Attempt | None = None,
    now: datetime | None = None,
) -> float | None:
    """RUNNING -> RETRYING with its attempt given back, returning the countdown: the disk was full,
    which is the host's failure, not the job's, and an administrator freeing space should find
    every job still there (with its attempts, a backlog failed for good within minutes).

    The countdown grows with the job's age (a quarter of it, 30 s to :data:`JOB_BACKOFF`'s cap),
    so a long outage costs one attempt per job every few minutes; a job older than
    :data:`STORAGE_FULL_RETRY_FOR` goes FAILED (None). None too when it is no longer running (with
    ``attempt``: no longer under that claim).
    """
    row = session.execute(select(Job.attempts, Job.created_at).where(Job.id == job_id)).one_or_none()
    if row is None or (attempt is not None and attempt.number != row.attempts):
        return None
    now = _now(session, now)
    created = row.created_at if row.created_at.tzinfo else row.created_at.replace(tzinfo=UTC)
    age = now - created
    if age > STORAGE_FULL_RETRY_FOR:
        fail(session, job_id, f"{error} (waited {STORAGE_FULL_RETRY_FOR} for room)", attempt=attempt, now=now)
        return None
    values = {
        "state": JobState.RETRYING,
        "attempts": Job.attempts - 1,
        "enqueued_at": now,
        "error": error[:MAX_ERROR_CHARS],
    }
    won = _move(
        session, Job, job_id, (JobState.RUNNING,), values, Job.attempts == row.attempts, *_under(attempt)
    )
    return min(JOB_BACKOFF.cap_s, max(30.0, age.total_seconds() / 4)) if won else None


def cancel(session: Session, job_id: int, *, now: datetime | None = None) -> bool:
    """QUEUED, RETRYING or RUNNING -> CANCELLED; a running worker then discards its outcome."""
    return _move(
        session,
        Job,
        job_id,
        ACTIVE_JOB_STATES,
        {"state": JobState.CANCELLED, "finished_at": _now(session, now)},
    )


def active_job(session: Session, instance_id: int) -> int | None:
    """The ID of a job of this instance that is still queued, running or retrying."""
    return session.scalar(
        select(Job.id).where(Job.instance_id == instance_id, Job.state.in_(ACTIVE_JOB_STATES)).limit(1)
    )


def rerun(session: Session, instance_id: int, *, model_version: str | None = None) -> Job | None:
    """A new QUEUED job for the instance; None while one of its jobs is still active."""
    if active_job(session, instance_id) is not None:
        return None
    return new_job(session, instance_id, model_version=model_version)


def requeue_stale(
    session: Session,
    *,
    stale_after: timedelta,
    lost_after: timedelta,
    max_attempts: int,
    now: datetime | None = None,
) -> list[int]:
    """The recovery rule; returns the IDs of jobs to send to the broker again (:func:`enqueue`).

    Queued or retrying jobs never sent, or sent longer than ``lost_after`` ago, lost their message
    (broker down or restarted). A job running longer than ``stale_after`` lost its worker: it goes
    back to QUEUED, or to FAILED when that was its last attempt.
    """
    now = _now(session, now)
    running_before = now - stale_after
    sent_before = now - lost_after
    waiting = (JobState.QUEUED, JobState.RETRYING)
    unsent = or_(Job.enqueued_at.is_(None), Job.enqueued_at < sent_before)
    stale = Job.started_at < running_before
    candidates = session.execute(
        select(Job.id, Job.state, Job.attempts).where(
            or_(Job.state.in_(waiting) & unsent, (Job.state == JobState.RUNNING) & stale)
        )
    ).all()
    ids: list[int] = []
    for job_id, state, attempts in candidates:
        if state != JobState.RUNNING:
            if _move(session, Job, job_id, waiting, {"enqueued_at": None}, unsent):
                ids.append(job_id)
        elif _requeue_lost(session, job_id, attempts, max_attempts, stale, now):
            ids.append(job_id)
    return ids


def lost_in_broker_restart(session: Session, restarted_at: datetime) -> tuple[list[int], list[int]]:
    """After a broker restart that kept no messages (Redis without persistence): the QUEUED jobs
    and PENDING deliveries whose message was sent before ``restarted_at``; returns (job IDs,
    delivery IDs) to send again now rather than after :func:`requeue_stale`'s ``lost_after``.

    A message that did survive (a persistent broker, or one a worker had already fetched) makes a
    second one harmless: :func:`claim` and :func:`start_sending` let only one of them work.
    RETRYING ones are left to their countdowns (already held by a worker) and the sweep.
    """
    sent_before = or_(Job.enqueued_at.is_(None), Job.enqueued_at < restarted_at)
    jobs = session.scalars(select(Job.id).where(Job.state == JobState.QUEUED, sent_before)).all()
    job_ids = [
        j for j in jobs if _move(session, Job, j, (JobState.QUEUED,), {"enqueued_at": None}, sent_before)
    ]
    deliveries = session.scalars(
        select(Delivery.id).where(Delivery.state == DeliveryState.PENDING, Delivery.created_at < restarted_at)
    ).all()
    return job_ids, list(deliveries)


def _requeue_lost(
    session: Session, job_id: int, attempts: int, max_attempts: int, held: ColumnElement[bool], now: datetime
) -> bool:
    """RUNNING -> QUEUED for a job whose worker is gone (True: send it again), or -> FAILED when that
    was its last attempt. ``held`` and the attempt count keep it from moving a job someone claimed
    meanwhile."""
    if attempts >= max_attempts:
        values = {"state": JobState.FAILED, "error": "worker lost on the last attempt", "finished_at": now}
        _move(session, Job, job_id, (JobState.RUNNING,), values, held, Job.attempts == attempts)
        return False
    values = {"state": JobState.QUEUED, "enqueued_at": None}
    return _move(session, Job, job_id, (JobState.RUNNING,), values, held, Job.attempts == attempts)


def requeue_abandoned(session: Session, holders: Collection[str], *, max_attempts: int) -> list[int]:
    """RUNNING jobs held by ``holders`` (``host:pid`` of worker processes known to be gone: killed
    when a stopping worker outlived its shutdown grace) back to QUEUED now rather than after
    ``stale_after``, or to FAILED when that was their last attempt (as :func:`requeue_stale`);
    returns the IDs to send again (:func:`enqueue`)."""
    if not holders:
        return []
    held = Job.worker.in_(sorted(holders))
    candidates = session.execute(
        select(Job.id, Job.attempts).where(Job.state == JobState.RUNNING, held)
    ).all()
    now = _now(session, None)
    return [
        job_id
        for job_id, attempts in candidates
        if _requeue_lost(session, job_id, attempts, max_attempts, held, now)
    ]


def requeue_lost_workers(
    session: Session,
    *,
    lost_after: timedelta,
    max_attempts: int,
    now: datetime | None = None,
) -> list[int]:
    """RUNNING jobs whose worker (``Job.worker_name``, a :class:`Worker` row) is gone back to
    QUEUED now rather than after ``stale_after``, or to FAILED when that was their last attempt
    (as :func:`requeue_stale`); returns the IDs to send again (:func:`enqueue`).

    Gone: no heartbeat for ``lost_after`` (a host powered off or cut from the network), stopped
    (a cold shutdown left the job), or started again since it claimed the job (a restart under the
    same name). The test is part of each UPDATE, so a heartbeat that arrives meanwhile keeps the
    job where it is; should the worker come back later, its outcome loses (:class:`Attempt`).
    """
    now = _now(session, now)
    gone = (
        select(Worker.id)
        .where(
            Worker.name == Job.worker_name,
            or_(
                Worker.last_seen < now - lost_after,
                Worker.stopped_at.is_not(None),
                Worker.started_at > Job.started_at,
            ),
        )
        .exists()
    )
    candidates = session.execute(
        select(Job.id, Job.attempts).where(Job.state == JobState.RUNNING, Job.worker_name.is_not(None), gone)
    ).all()
    return [
        job_id
        for job_id, attempts in candidates
        if _requeue_lost(session, job_id, attempts, max_attempts, gone, now)
    ]


# Deliveries ---------------------------------------------------------------------------------------


def upsert_delivery(
    session: Session,
    *,
    result_id: int,
    destination: str,
    sop_class_uid: str,
    sop_instance_uid: str,
    storage_key: str,
    study_uid: str | None,
) -> int | None:
    """The outbox row of one output to one destination, PENDING; returns its ID to send now, or
    None when that object is already DELIVERED there (outputs are deterministic: it is the same).

    ``study_uid`` places it in its study's line to that destination (:func:`wait_in_line`).
    """
    where = (Delivery.destination == destination, Delivery.sop_instance_uid == sop_instance_uid)
    existing = session.scalar(select(Delivery.id).where(*where))
    if existing is None:
        d = Delivery(
            result_id=result_id,
            destination=destination,
            sop_class_uid=sop_class_uid,
            sop_instance_uid=sop_instance_uid,
            storage_key=storage_key,
            study_uid=study_uid,
            state=DeliveryState.PENDING,
            attempts=0,
            created_at=_now(session, None),  # the clock lost_deliveries compares it with
        )
        session.add(d)
        session.flush()
        return d.id
    session.execute(
        update(Delivery)
        .where(Delivery.id == existing)
        .values(result_id=result_id, study_uid=study_uid)
        .execution_options(synchronize_session=False)
    )
    not_delivered = [s for s in DeliveryState if s != DeliveryState.DELIVERED]
    values = {"state": DeliveryState.PENDING, "storage_key": storage_key}
    return existing if _move(session, Delivery, existing, not_delivered, values) else None


def _line(session: Session, delivery_id: int) -> tuple[str, str] | None:
    """The (destination, study) line a delivery stands in; None: it stands in none (before 0007)."""
    row = session.execute(
        select(Delivery.destination, Delivery.study_uid).where(Delivery.id == delivery_id)
    ).one_or_none()
    if row is None or row.study_uid is None:
        return None
    return row.destination, row.study_uid


def _in_line(destination: str, study_uid: str, row: Any = Delivery) -> ColumnElement[bool]:
    """``row`` (the Delivery model or an alias of it) stands in this line and holds its place."""
    return cast(
        ColumnElement[bool],
        (row.destination == destination)
        & (row.study_uid == study_uid)
        & row.state.in_(IN_LINE_DELIVERY_STATES),
    )


def wait_in_line(session: Session, delivery_id: int) -> bool:
    """PENDING or RETRYING -> WAITING while an older delivery of the same study to the same
    destination is still in line; True then: do not send it, :func:`release_next` will.

    The test for an older one is part of the UPDATE, so on SQLite (one writer at a time) a
    predecessor ends either before it (and is seen as done) or after it (and releases this one).
    On PostgreSQL the older rows are first read ``FOR SHARE``, which waits for a predecessor
    being ended right now. Should a WAITING row still head its line, :func:`lost_deliveries`
    releases it.
    """
    line = _line(session, delivery_id)
    if line is None:
        return False
    older = aliased(Delivery)
    ahead = select(older.id).where(_in_line(*line, older), older.id < delivery_id)
    if session.get_bind().dialect.name == "postgresql":
        session.scalars(ahead.with_for_update(read=True)).all()
    return _move(
        session,
        Delivery,
        delivery_id,
        (DeliveryState.PENDING, DeliveryState.RETRYING),
        {"state": DeliveryState.WAITING},
        ahead.exists(),
    )


def release_next(session: Session, delivery_id: int) -> list[int]:
    """After a delivery ended (DELIVERED or DEAD): the head of its line, when WAITING, -> PENDING;
    returns the ID to send (none when the head has a message of its own or the line is empty).

    Call in the transaction that ended it, after the change (see :func:`wait_in_line`)."""
    line = _line(session, delivery_id)
    if line is None:
        return []
    head = session.scalar(select(Delivery.id).where(_in_line(*line)).order_by(Delivery.id).limit(1))
    if head is None:
        return []
    won = _move(session, Delivery, head, (DeliveryState.WAITING,), {"state": DeliveryState.PENDING})
    return [head] if won else []


def wake_destination(session: Session, destination: str, *, now: datetime | None = None) -> list[int]:
    """RETRYING deliveries to ``destination`` due later made due now (at most :data:`WAKE_LIMIT`);
    returns their IDs to send.

    Called when the destination has just taken an object: it is back, and the backoff of each
    delivery that failed during its outage (up to an hour) need not run out first.
    """
    now = _now(session, now)
    later = (
        (Delivery.destination == destination)
        & (Delivery.state == DeliveryState.RETRYING)
        & (Delivery.next_attempt_at > now + DELIVERY_DUE_SLACK)
    )
    ids = list(session.scalars(select(Delivery.id).where(later).order_by(Delivery.id).limit(WAKE_LIMIT)))
    if not ids:
        return []
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_(ids), later)
        .values(next_attempt_at=now)
        .execution_options(synchronize_session=False)
    )
    return ids


def sleeping_destinations(session: Session, *, now: datetime | None = None) -> list[str]:
    """Destinations with deliveries RETRYING and not due yet: the ones a probe should try, since
    one that answers again need not wait for the backoff (:func:`wake_destination`)."""
    now = _now(session, now)
    later = (Delivery.state == DeliveryState.RETRYING) & (Delivery.next_attempt_at > now + DELIVERY_DUE_SLACK)
    return list(
        session.scalars(select(Delivery.destination).where(later).distinct().order_by(Delivery.destination))
    )


def start_sending(session: Session, delivery_id: int, *, now: datetime | None = None) -> bool:
    """PENDING, RETRYING or SENDING -> SENDING, one attempt more; False when delivered or dead,
    or RETRYING and not due yet.

    SENDING is taken over: a redelivered message means its worker died mid-send, and a second
    C-STORE of the same SOP Instance UID is harmless to the peer. A RETRYING row is sent only once
    its ``next_attempt_at`` (less :data:`DELIVERY_DUE_SLACK`) has come: a second message for it
    (the recovery sweeps of several processes, the countdown of an earlier failure) would
    otherwise spend an attempt of its budget at once and dead-letter it long before the backoff
    says (a PACS down for an hour).
    """
    due = or_(
        Delivery.state != DeliveryState.RETRYING,
        Delivery.next_attempt_at.is_(None),
        Delivery.next_attempt_at <= _now(session, now) + DELIVERY_DUE_SLACK,
    )
    return _move(
        session,
        Delivery,
        delivery_id,
        (DeliveryState.PENDING, DeliveryState.RETRYING, DeliveryState.SENDING),
        {"state": DeliveryState.SENDING, "attempts": Delivery.attempts + 1},
        due,
    )


def delivered(session: Session, delivery_id: int, *, now: datetime | None = None) -> bool:
    """SENDING -> DELIVERED: the peer confirmed the C-STORE."""
    values = {
        "state": DeliveryState.DELIVERED,
        "delivered_at": _now(session, now),
        "last_error": None,
        "next_attempt_at": None,
    }
    return _move(session, Delivery, delivery_id, (DeliveryState.SENDING,), values)


def fail_or_retry_delivery(
    session: Session,
    delivery_id: int,
    error: str,
    *,
    permanent: bool = False,
    not_before: float = 0.0,
    now: datetime | None = None,
) -> float | None:
    """SENDING -> RETRYING, returning seconds until the next try (:data:`DELIVERY_BACKOFF`, or
    ``not_before`` when the peer asked to wait longer: an HTTP Retry-After); or -> DEAD when the
    error is permanent or this was attempt :data:`DELIVERY_MAX_ATTEMPTS`, returning None. None
    too when another sender took the row over meanwhile."""
    attempts = session.scalar(select(Delivery.attempts).where(Delivery.id == delivery_id))
    if attempts is None:
        return None
    now = _now(session, now)
    dead = permanent or attempts >= DELIVERY_MAX_ATTEMPTS
    delay = None if dead else max(DELIVERY_BACKOFF.delay(attempts), not_before)
    values: dict[str, Any] = {"last_error": error[:MAX_ERROR_CHARS]}
    if delay is None:
        values |= {"state": DeliveryState.DEAD, "next_attempt_at": None}
    else:
        values |= {"state": DeliveryState.RETRYING, "next_attempt_at": now + timedelta(seconds=delay)}
    won = _move(
        session, Delivery, delivery_id, (DeliveryState.SENDING,), values, Delivery.attempts == attempts
    )
    return delay if won else None


def resend(session: Session, delivery_id: int, *, now: datetime | None = None) -> bool:
    """Any state but SENDING -> PENDING, due now, with a fresh attempt budget ("re-send")."""
    return _move(
        session,
        Delivery,
        delivery_id,
        [s for s in DeliveryState if s != DeliveryState.SENDING],
        {
            "state": DeliveryState.PENDING,
            "attempts": 0,
            "next_attempt_at": _now(session, now),
            "last_error": None,
        },
    )


def lost_deliveries(session: Session, *, now: datetime | None = None) -> list[int]:
    """Deliveries that should have been attempted by now but were not: send their messages again.

    A WAITING delivery that heads its line goes back to PENDING here: a safety net, since every
    path that ends a delivery releases the next in its own transaction (:func:`release_next`).
    """
    now = _now(session, now)
    due_before = now - DELIVERY_LOST_AFTER
    older = aliased(Delivery)
    stuck = select(Delivery.id).where(
        Delivery.state == DeliveryState.WAITING,
        ~select(older.id)
        .where(
            older.destination == Delivery.destination,
            older.study_uid == Delivery.study_uid,
            older.id < Delivery.id,
            older.state.in_(IN_LINE_DELIVERY_STATES),
        )
        .exists(),
    )
    released = [
        d
        for d in session.scalars(stuck).all()
        if _move(session, Delivery, d, (DeliveryState.WAITING,), {"state": DeliveryState.PENDING})
    ]
    return released + list(
        session.scalars(
            select(Delivery.id).where(
                or_(
                    (Delivery.state == DeliveryState.PENDING) & (Delivery.created_at < due_before),
                    (Delivery.state == DeliveryState.RETRYING) & (Delivery.next_attempt_at < due_before),
                    (Delivery.state == DeliveryState.SENDING)
                    & (Delivery.created_at < now - DELIVERY_SENDING_LOST_AFTER),
                )
            )
        )
    )
