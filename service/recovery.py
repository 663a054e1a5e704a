"""Recovery sweep: index spooled objects and re-send jobs whose broker message was lost.

Runs at start-up and periodically in the SCP and worker processes. Safe to run concurrently
and repeatedly: indexing is keyed by (SOP Instance UID, SHA-256) and tasks are idempotent.
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import UTC, datetime, timedelta

from sqlalchemy import or_, select

from service.core.db import session_scope
from service.core.logs import ctx
from service.core.models import Job, JobState
from service.core.outbox import lost_deliveries
from service.core.queue import enqueue_delivery
from service.core.settings import Settings
from service.core.storage import ObjectStore
from service.receive import spool
from service.receive.ingest import enqueue_job, index_object, rules_from
from service.receive.validate import RejectedObject, read_header

log = logging.getLogger(__name__)


def drain_spool(settings: Settings, store: ObjectStore) -> int:
    done = 0
    for record_path, record in spool.pending(settings):
        key = str(record["key"])
        try:
            header, _ = read_header(store.path(key))
            ignore = rules_from(settings).decide(header, record.get("calling_ae"))
            size = store.path(key).stat().st_size
            sha = key.rsplit("/", 1)[-1].removesuffix(".dcm")
            outcome = index_object(
                header,
                key,
                sha,
                size,
                calling_ae=record.get("calling_ae"),
                ignore_reason=ignore,
                settings=settings,
            )
        except (RejectedObject, ValueError):  # a bad record or object: nothing to index, drop the record
            log.warning("spooled object unreadable; left in storage", extra=ctx(key=key))
        except Exception:
            log.warning("spool not drained yet", extra=ctx(key=key))
            return done
        else:
            if outcome.job_id is not None:
                enqueue_job(outcome.job_id, settings)
        record_path.unlink(missing_ok=True)
        done += 1
    return done


def requeue_stale_jobs(settings: Settings) -> int:
    """Jobs never sent (broker down) or running far too long (worker killed) go back on the queue."""
    now = datetime.now(UTC)
    stale_running = now - timedelta(seconds=settings.stale_job_after)
    lost_queued = now - timedelta(seconds=max(60, settings.task_time_limit))
    ids: list[int] = []
    with session_scope(settings.db_url) as session:
        jobs = session.scalars(
            select(Job).where(
                or_(
                    (Job.state == JobState.QUEUED) & Job.enqueued_at.is_(None),
                    (Job.state.in_([JobState.QUEUED, JobState.RETRYING])) & (Job.enqueued_at < lost_queued),
                    (Job.state == JobState.RUNNING) & (Job.started_at < stale_running),
                )
            )
        ).all()
        for job in jobs:
            if job.state == JobState.RUNNING and job.attempts >= settings.job_max_attempts:
                job.state = JobState.FAILED
                job.error = "worker lost on the last attempt"
                job.finished_at = now
                continue
            if job.state == JobState.RUNNING:
                job.state = JobState.QUEUED
            job.enqueued_at = None
            ids.append(job.id)
    for job_id in ids:
        enqueue_job(job_id, settings)
    if ids:
        log.info("re-queued jobs", extra=ctx(count=len(ids)))
    return len(ids)


def remove_stale_temp_files(settings: Settings, store: ObjectStore, now: float | None = None) -> int:
    """Delete temporary files no receive can still be writing (a killed SCP process leaves them).

    A live receive writes at least every network timeout; twice that, and an hour at least, of
    silence means the writer is gone. Finished objects are never here: they were renamed away.
    """
    limit = max(3600.0, 2 * settings.network_timeout, 2 * settings.dimse_timeout)
    now = time.time() if now is None else now
    removed = 0
    for path in store.tmp_dir.iterdir():
        try:
            if path.is_file() and now - path.stat().st_mtime > limit:
                path.unlink()
                removed += 1
        except OSError:
            continue
    if removed:
        log.info("removed abandoned temporary files", extra=ctx(count=removed))
    return removed


def requeue_lost_deliveries(settings: Settings) -> int:
    """Deliveries whose countdown message was lost (broker restart) are sent again."""
    with session_scope(settings.db_url) as session:
        ids = lost_deliveries(session)
    for delivery_id in ids:
        enqueue_delivery(delivery_id)
    if ids:
        log.info("re-queued deliveries", extra=ctx(count=len(ids)))
    return len(ids)


def sweep(settings: Settings, store: ObjectStore) -> None:
    try:
        drain_spool(settings, store)
        requeue_stale_jobs(settings)
        requeue_lost_deliveries(settings)
        remove_stale_temp_files(settings, store)
    except Exception as exc:
        log.warning("recovery sweep failed; will retry", extra=ctx(error=type(exc).__name__))


def start_background(settings: Settings, store: ObjectStore, interval: float = 30.0) -> threading.Event:
    """Run :func:`sweep` now and every ``interval`` seconds in a daemon thread; set the event to stop."""
    stop = threading.Event()

    def loop() -> None:
        while True:
            sweep(settings, store)
            if stop.wait(interval):
                return

    threading.Thread(target=loop, name="lusai-recovery", daemon=True).start()
    return stop
