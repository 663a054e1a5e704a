"""Recovery sweep: re-send jobs and deliveries whose broker message was lost, drop abandoned temp files.

Runs at start-up and periodically in the SCP and worker processes; the composition root adds its
own steps (the SCP's spool draining, :func:`service.receive.spool.drain_spool`). Safe to run
concurrently and repeatedly: the re-queue rules are atomic transitions (:mod:`service.core.lifecycle`)
and tasks are idempotent.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import timedelta
from functools import partial

from service.core import lifecycle, registry
from service.core.logs import ctx
from service.core.queue import ANALYZE_CPU_QUEUE, ANALYZE_GPU_QUEUE
from service.core.runtime import Runtime

log = logging.getLogger(__name__)

#: One step of a sweep; any exception ends that sweep, the next one tries again.
Step = Callable[[], object]
#: Seconds, beyond a heartbeat interval, a process waits after reaching the database again before
#: it declares a worker lost (:class:`LostWorkers`): time for the live ones to beat once more.
HEARTBEAT_SLACK_S = 2.0


def requeue_stale_jobs(runtime: Runtime) -> int:
    """Jobs never sent (broker down) or running far too long (worker killed) go back on the queue."""
    settings = runtime.settings
    with runtime.db.session() as session:
        ids = lifecycle.requeue_stale(
            session,
            stale_after=timedelta(seconds=settings.stale_job_after),
            lost_after=timedelta(seconds=max(60, settings.task_time_limit)),
            max_attempts=settings.job_max_attempts,
        )
    for job_id in ids:  # one short transaction each: no database lock held across broker calls
        with runtime.db.session() as session:
            lifecycle.enqueue(session, job_id, runtime.queue.enqueue_analysis)
    if ids:
        log.info("re-queued jobs", extra=ctx(count=len(ids)))
    return len(ids)


def requeue_jobs_of_lost_workers(runtime: Runtime) -> int:
    """Running jobs of workers the registry has not heard from for ``LUSAI_WORKER_LOST_AFTER`` (a
    host powered off or cut off), or that stopped or started again without finishing them, go
    back on the queue now: the backstop, :func:`requeue_stale_jobs`, waits ``LUSAI_STALE_JOB_AFTER``.
    Should the lost worker come back and finish, its outcome is discarded (``lifecycle.Attempt``)."""
    settings = runtime.settings
    with runtime.db.session() as session:
        ids = lifecycle.requeue_lost_workers(
            session,
            lost_after=timedelta(seconds=settings.lost_after),
            max_attempts=settings.job_max_attempts,
        )
    for job_id in ids:
        with runtime.db.session() as session:
            lifecycle.enqueue(session, job_id, runtime.queue.enqueue_analysis)
    if ids:
        log.warning("jobs of a lost worker re-queued", extra=ctx(count=len(ids), job_ids=ids))
    return len(ids)


class GpuWorkersGone:
    """A sweep step for ``LUSAI_ANALYZE_ROUTING=prefer-gpu``: when the last live GPU worker is
    lost, the jobs still queued were sent to ``analyze.gpu``, which nobody consumes now; they are
    sent again at once (to ``analyze.cpu``) rather than after :func:`requeue_stale_jobs`'s
    ``max(60 s, LUSAI_TASK_TIME_LIMIT)``. A message that waits on ``analyze.gpu`` for a GPU
    worker's return is then harmless: :func:`lifecycle.claim` lets one of the two work."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.queue: str | None = None

    def __call__(self) -> int:
        if self.runtime.settings.analyze_routing != "prefer-gpu":
            return 0
        queue = self.runtime.queue.analyze_queue(fresh=True)
        seen, self.queue = self.queue, queue
        if seen != ANALYZE_GPU_QUEUE or queue != ANALYZE_CPU_QUEUE:
            return 0
        with self.runtime.db.session() as session:
            job_ids, _ = lifecycle.lost_in_broker_restart(session, lifecycle.db_now(session))
        for job_id in job_ids:
            with self.runtime.db.session() as session:
                lifecycle.enqueue(session, job_id, self.runtime.queue.enqueue_analysis)
        log.warning("no GPU worker alive: queued jobs sent to the CPU workers", extra=ctx(jobs=len(job_ids)))
        return len(job_ids)


class LostWorkers:
    """The sweep step of :func:`requeue_jobs_of_lost_workers`, once this process has reached the
    database for a heartbeat interval (and :data:`HEARTBEAT_SLACK_S`) without a gap.

    After an outage of the database (or of this host's link to it) every worker's last heartbeat
    is old, live ones included, until each has beaten again: a sweep right then would take every
    running job from its worker (each would be done twice, one result kept). A gap is a call
    longer than ``LUSAI_RECOVERY_INTERVAL + LUSAI_HEARTBEAT_INTERVAL`` after the last good one (the
    sweeps in between failed), or this process's first sweep.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.last_ok: float | None = None  # monotonic time of the last call that reached the database
        self.since: float = 0.0  # start of the current run of calls without a gap

    def __call__(self) -> int:
        settings = self.runtime.settings
        now = time.monotonic()
        if (
            self.last_ok is None
            or now - self.last_ok > settings.recovery_interval + settings.heartbeat_interval
        ):
            self.since = now
        if now - self.since < settings.heartbeat_interval + HEARTBEAT_SLACK_S:
            self.runtime.db.ping()  # raises while the database is away: the gap goes on
            self.last_ok = now
            return 0
        count = requeue_jobs_of_lost_workers(self.runtime)
        self.last_ok = now
        return count


def forget_workers(runtime: Runtime) -> int:
    """Drop registry rows of workers stopped or lost a day ago."""
    with runtime.db.session() as session:
        return registry.forget(session)


def requeue_jobs_of(runtime: Runtime, pids: Iterable[int]) -> int:
    """Jobs held by these processes of this host, which are gone (a stopping worker killed after
    ``LUSAI_SHUTDOWN_GRACE``), go back on the queue now: the embedded broker has consumed their
    message already and Redis would redeliver it only after its visibility timeout."""
    host = socket.gethostname()
    with runtime.db.session() as session:
        ids = lifecycle.requeue_abandoned(
            session, {f"{host}:{pid}" for pid in pids}, max_attempts=runtime.settings.job_max_attempts
        )
    for job_id in ids:
        with runtime.db.session() as session:
            lifecycle.enqueue(session, job_id, runtime.queue.enqueue_analysis)
    if ids:
        log.warning("jobs of a killed worker re-queued", extra=ctx(count=len(ids)))
    return len(ids)


def requeue_lost_deliveries(runtime: Runtime) -> int:
    """Deliveries whose countdown message was lost (broker restart) are sent again."""
    with runtime.db.session() as session:
        ids = lifecycle.lost_deliveries(session)
    for delivery_id in ids:
        runtime.queue.enqueue_delivery(delivery_id)
    if ids:
        log.info("re-queued deliveries", extra=ctx(count=len(ids)))
    return len(ids)


class BrokerRestarts:
    """A sweep step that notices a broker restart (a new Redis ``run_id``) and sends again, at
    once, the jobs and deliveries whose message went before it; without it they wait for
    :func:`requeue_stale_jobs`'s ``max(60 s, LUSAI_TASK_TIME_LIMIT)`` (15 min by default)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.run_id: str | None = None

    def __call__(self) -> int:
        try:
            started = self.runtime.queue.broker_started()
        except Exception as exc:  # down: the other steps still run; the restart is seen once it is back
            log.debug("broker not reachable", extra=ctx(error=type(exc).__name__))
            return 0
        if started is None:
            return 0
        run_id, uptime_s = started
        seen, self.run_id = self.run_id, run_id
        if seen is None or seen == run_id:
            return 0
        with self.runtime.db.session() as session:
            # Two clocks (the database's, the broker's whole-second uptime): the slack goes the
            # way that re-sends too much, never too little. A job sent a second before the restart
            # is lost with it; a second message of one sent just after is harmless (claim lets one
            # of them work). Found by bench/multihost.py: jobs sent in the last 5 s before the
            # restart waited 15 minutes.
            restarted_at = lifecycle.db_now(session) - timedelta(seconds=uptime_s) + timedelta(seconds=5)
            job_ids, delivery_ids = lifecycle.lost_in_broker_restart(session, restarted_at)
        for job_id in job_ids:
            with self.runtime.db.session() as session:
                lifecycle.enqueue(session, job_id, self.runtime.queue.enqueue_analysis)
        for delivery_id in delivery_ids:
            self.runtime.queue.enqueue_delivery(delivery_id)
        log.warning(
            "broker restarted: messages sent before it sent again",
            extra=ctx(jobs=len(job_ids), deliveries=len(delivery_ids)),
        )
        return len(job_ids) + len(delivery_ids)


def remove_stale_temp_files(runtime: Runtime, now: float | None = None) -> int:
    """Delete temporary files no receive can still be writing (a killed SCP process leaves them).

    A live receive writes at least every network timeout; twice that, and an hour at least, of
    silence means the writer is gone. Finished objects are never here: they were renamed away.
    """
    settings = runtime.settings
    limit = max(3600.0, 2 * settings.network_timeout, 2 * settings.dimse_timeout)
    now = time.time() if now is None else now
    removed = 0
    for path in runtime.store.tmp_dir.iterdir():
        try:
            if path.is_file() and now - path.stat().st_mtime > limit:
                path.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed abandoned temporary files", extra=ctx(count=removed))
    return removed


def steps(runtime: Runtime) -> list[Step]:
    """The core's part of a sweep, in order: a broker restart, jobs of lost workers, jobs queued
    for GPU workers that are gone, lost jobs, lost deliveries, abandoned temp files, forgotten
    workers."""
    return [
        BrokerRestarts(runtime),
        LostWorkers(runtime),
        GpuWorkersGone(runtime),
        partial(requeue_stale_jobs, runtime),
        partial(requeue_lost_deliveries, runtime),
        partial(remove_stale_temp_files, runtime),
        partial(forget_workers, runtime),
    ]


def sweep(sweep_steps: Sequence[Step]) -> None:
    """Run the steps in order; a failure (database or broker down) is logged, the next sweep retries."""
    try:
        for step in sweep_steps:
            step()
    except Exception as exc:
        log.warning("recovery sweep failed; will retry", extra=ctx(error=type(exc).__name__))


def start_background(sweep_steps: Sequence[Step], interval: float = 30.0) -> threading.Event:
    """Run :func:`sweep` now and every ``interval`` seconds in a daemon thread; set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            sweep(sweep_steps)
            if stop.wait(interval):
                return

    threading.Thread(target=loop, name="lusai-recovery", daemon=True).start()
    return stop
