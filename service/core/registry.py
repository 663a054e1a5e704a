"""The worker registry: which Celery workers are alive, on which host and device, doing what.

Each worker's main process registers itself in the ``workers`` table when it starts
(:class:`Heartbeat`, wired in ``workers/celery_app.py``), writes ``last_seen`` every
``LUSAI_HEARTBEAT_INTERVAL`` seconds from a thread of its own (the analyses run in its pool
processes, so a long CPU job never holds a heartbeat up) and marks itself stopped on a clean
shutdown. A worker not seen for ``LUSAI_WORKER_LOST_AFTER`` is *lost* (a host powered off or cut
from the network sends no RST, so nothing else would tell): the recovery sweep puts its running
jobs back on the queue (:func:`service.core.lifecycle.requeue_lost_workers`), the producer stops
routing to its device (:meth:`service.core.queue.TaskQueue.analyze_queue`), and ``/health`` and
``/metrics`` show it. Every stamp is the database's clock (:func:`service.core.lifecycle.db_now`),
as for jobs: the hosts' clocks are never compared.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, delete, func, select, update
from sqlalchemy.orm import Session

from service.core.db import Database
from service.core.lifecycle import db_now
from service.core.logs import ctx
from service.core.models import Job, JobState, Worker

log = logging.getLogger(__name__)

#: A worker stopped or lost this long ago is dropped from the registry (its jobs were re-queued
#: long before); one started again under the same name registers anew.
FORGET_AFTER = timedelta(days=1)
#: Seconds a fork of a worker's main process waits for a heartbeat in progress (:class:`Heartbeat`).
FORK_WAIT_S = 10.0


@dataclass(frozen=True)
class Identity:
    """What a worker says about itself when it registers."""

    name: str  # Celery node name, name@host
    host: str
    pid: int
    queues: tuple[str, ...]
    device: str  # cpu | cuda
    gpu_name: str | None
    concurrency: int
    version: str


def register(session: Session, me: Identity, *, up_for: float = 0.0) -> datetime:
    """Insert or renew ``me``'s row: seen now, not stopped, counters from zero; returns its start.

    ``up_for``: seconds the worker has been running already (a registration made again after the
    database was unreachable): its start is dated back by the worker's own monotonic clock, so
    jobs it claimed meanwhile are not taken for those of an earlier run of the same name.
    """
    now = db_now(session)
    started = now - timedelta(seconds=max(0.0, up_for))
    values: dict[str, Any] = {
        "host": me.host[:128],
        "pid": me.pid,
        "queues": list(me.queues),
        "device": me.device[:16],
        "gpu_name": me.gpu_name[:128] if me.gpu_name else None,
        "concurrency": me.concurrency,
        "version": me.version[:64],
        "started_at": started,
        "last_seen": now,
        "stopped_at": None,
        "jobs_done": 0,
        "jobs_failed": 0,
    }
    changed = session.execute(
        update(Worker)
        .where(Worker.name == me.name)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if cast(CursorResult[Any], changed).rowcount == 0:
        session.add(Worker(name=me.name, **values))
        session.flush()
    return started


def beat(session: Session, name: str) -> bool:
    """``last_seen`` of a registered, running worker set to now; False when it has no row (forgotten,
    or never registered: register it) or is marked stopped."""
    changed = session.execute(
        update(Worker)
        .where(Worker.name == name, Worker.stopped_at.is_(None))
        .values(last_seen=db_now(session))
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], changed).rowcount == 1


def stopped(session: Session, name: str) -> bool:
    """Mark the worker stopped (a clean shutdown: it finished what it had in hand)."""
    now = db_now(session)
    changed = session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values(stopped_at=now, last_seen=now)
        .execution_options(synchronize_session=False)
    )
    return cast(CursorResult[Any], changed).rowcount == 1


def count_job(session: Session, name: str, *, failed: bool) -> None:
    """One job more done (or failed) by the worker ``name`` (its pool processes call this)."""
    column = Worker.jobs_failed if failed else Worker.jobs_done
    session.execute(
        update(Worker)
        .where(Worker.name == name)
        .values({column: column + 1})
        .execution_options(synchronize_session=False)
    )


def alive(lost_after: float, now: datetime) -> ColumnElement[bool]:
    """A worker row that is running and was seen within ``lost_after`` seconds of ``now``."""
    return cast(
        ColumnElement[bool],
        Worker.stopped_at.is_(None) & (Worker.last_seen >= now - timedelta(seconds=lost_after)),
    )


@dataclass(frozen=True)
class JobInFlight:
    job_id: int
    since: datetime | None


@dataclass(frozen=True)
class WorkerStatus:
    """A registered worker that has not stopped, as ``/health`` and ``/metrics`` show it."""

    name: str
    host: str
    pid: int
    queues: tuple[str, ...]
    device: str
    gpu_name: str | None
    concurrency: int
    version: str
    started_at: datetime
    last_seen_s: float  # seconds since its last heartbeat (database clock)
    alive: bool  # False: lost
    jobs: tuple[JobInFlight, ...]  # RUNNING jobs it claimed
    jobs_done: int
    jobs_failed: int

    def consumes(self, queues: Sequence[str]) -> bool:
        return any(q in self.queues for q in queues)


def _aware(t: datetime) -> datetime:
    """SQLite gives naive datetimes back; they were written in UTC."""
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def workers(session: Session, *, lost_after: float) -> list[WorkerStatus]:
    """Every registered worker not stopped, alive or lost, by name, with the jobs it holds."""
    now = db_now(session)
    rows = session.scalars(select(Worker).where(Worker.stopped_at.is_(None)).order_by(Worker.name)).all()
    held: dict[str, list[JobInFlight]] = {}
    if rows:
        running = session.execute(
            select(Job.worker_name, Job.id, Job.started_at)
            .where(Job.state == JobState.RUNNING, Job.worker_name.in_([w.name for w in rows]))
            .order_by(Job.id)
        )
        for name, job_id, since in running:
            held.setdefault(name or "", []).append(JobInFlight(job_id, _aware(since) if since else None))
    out = []
    for w in rows:
        age = max(0.0, (_aware(now) - _aware(w.last_seen)).total_seconds())
        out.append(
            WorkerStatus(
                name=w.name,
                host=w.host,
                pid=w.pid,
                queues=tuple(w.queues or ()),
                device=w.device,
                gpu_name=w.gpu_name,
                concurrency=w.concurrency,
                version=w.version,
                started_at=_aware(w.started_at),
                last_seen_s=round(age, 1),
                alive=age <= lost_after,
                jobs=tuple(held.get(w.name, ())),
                jobs_done=w.jobs_done,
                jobs_failed=w.jobs_failed,
            )
        )
    return out


def gpu_worker_alive(session: Session, *, lost_after: float, queue: str) -> bool:
    """Whether a live CUDA worker consumes ``queue`` (the producer's routing, ``prefer-gpu``)."""
    now = db_now(session)
    rows = session.scalars(select(Worker.queues).where(alive(lost_after, now), Worker.device == "cuda")).all()
    return any(queue in (q or ()) for q in rows)


def forget(session: Session) -> int:
    """Drop the rows of workers stopped or lost more than :data:`FORGET_AFTER` ago."""
    before = db_now(session) - FORGET_AFTER
    changed = session.execute(delete(Worker).where(Worker.last_seen < before))
    return cast(CursorResult[Any], changed).rowcount or 0


def oldest_queued_age(session: Session) -> float:
    """Seconds the oldest QUEUED job has waited since it was made (0: none queued)."""
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
    if oldest is None:
        return 0.0
    return max(0.0, (_aware(db_now(session)) - _aware(oldest)).total_seconds())


class Heartbeat:
    """A worker's registration and its heartbeat thread.

    :meth:`start` starts a daemon thread that registers (a failure is logged; it registers once
    the database answers) and then writes ``last_seen`` every ``interval`` seconds;
    :meth:`stop` ends it and marks the worker stopped. ``db`` should be unpooled
    (``Database(url, pooled=False)``): the worker's main process forks its pool processes, which
    must not inherit an open connection.

    Nor a lock held by this thread: a pool process forked while a heartbeat was importing a
    module (the first one does) or inside the database driver hung on the same lock before it ran
    a single job (seen with ``lusai serve``). So each heartbeat holds ``_busy``, and a fork of this
    process waits for it (``os.register_at_fork``, at most :data:`FORK_WAIT_S`): a pool process is
    only ever forked while this thread sleeps.
    """

    def __init__(self, db: Database, me: Identity, interval: float) -> None:
        self.db = db
        self.me = me
        self.interval = interval
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False
        self._busy = threading.Lock()
        self._held_for_fork = False
        os.register_at_fork(
            before=self._before_fork, after_in_parent=self._after_fork, after_in_child=self._after_fork
        )

    def _before_fork(self) -> None:
        self._held_for_fork = self._busy.acquire(timeout=FORK_WAIT_S)

    def _after_fork(self) -> None:
        if self._held_for_fork:
            self._held_for_fork = False
            self._busy.release()

    def start(self) -> None:
        """Register and heartbeat from a thread (a database that does not answer never holds up
        the worker's start)."""
        self._thread = threading.Thread(target=self._run, name="lusai-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        self.beat()
        while not self._stop.wait(self.interval):
            self.beat()

    def beat(self) -> bool:
        """One heartbeat (registering when the row is missing); False when the database failed."""
        with self._busy:
            return self._beat()

    def _beat(self) -> bool:
        try:
            with self.db.session() as session:
                if not beat(session, self.me.name):
                    register(session, self.me, up_for=time.monotonic() - self._started)
                    log.info(
                        "worker registered", extra=ctx(worker=self.me.name, queues=",".join(self.me.queues))
                    )
        except Exception as exc:
            level = logging.DEBUG if self._failing else logging.WARNING
            log.log(
                level, "worker heartbeat failed", extra=ctx(worker=self.me.name, error=type(exc).__name__)
            )
            self._failing = True
            return False
        if self._failing:
            log.info("worker heartbeat back", extra=ctx(worker=self.me.name))
        self._failing = False
        return True

    def stop(self) -> None:
        """End the heartbeats and mark the worker stopped (a clean shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.interval))
        try:
            with self._busy, self.db.session() as session:
                stopped(session, self.me.name)
        except Exception as exc:  # it will look lost after LUSAI_WORKER_LOST_AFTER instead
            log.warning("worker not marked stopped", extra=ctx(worker=self.me.name, error=type(exc).__name__))
