"""Thin Celery tasks: load by ID, call the pure stages, save, chain onward.

Tasks take row IDs, never datasets, and are idempotent: outputs have UIDs derived from the source
instance and model version, the Result row is replaced, and a job that already succeeded is skipped,
so ``acks_late`` redelivery after a killed worker is safe.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import pydicom
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from service.core.db import session_scope
from service.core.logs import ctx
from service.core.models import Job, JobState
from service.core.queue import ANALYZE_TASK, DELIVER_TASK, enqueue_delivery
from service.core.settings import get_settings
from service.core.storage import ObjectStore
from workers.celery_app import app
from workers.results import save_result

log = logging.getLogger(__name__)
_analyzer: Any = None


def get_analyzer() -> Any:
    """One model per worker process, loaded on first use (not at import: the API imports nothing here)."""
    global _analyzer
    if _analyzer is None:
        from workers.pipeline import Analyzer

        s = get_settings()
        _analyzer = Analyzer(package=s.model_path, device=s.device)
    return _analyzer


def _claim(job_id: int) -> tuple[str, str | None] | None:
    """Mark the job running; None when there is nothing to do (done, cancelled, vanished).

    Returns the storage key and the model version the job asked for (None: whatever is loaded).
    """
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.state in (JobState.SUCCEEDED, JobState.CANCELLED, JobState.FAILED):
            return None
        job.state = JobState.RUNNING
        job.attempts += 1
        job.started_at = datetime.now(UTC)
        job.worker = f"{socket.gethostname()}:{os.getpid()}"[:128]
        job.error = None
        return job.instance.storage_key, job.model_version


@app.task(name=ANALYZE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def analyze(self: Task, job_id: int) -> str:
    settings = get_settings()
    claimed = _claim(job_id)
    if claimed is None:
        return "skipped"
    storage_key, wanted_version = claimed
    store = ObjectStore(settings.storage)
    t0 = time.perf_counter()
    try:
        from workers.pipeline import InputError

        analyzer = get_analyzer()
        if wanted_version and wanted_version != analyzer.model.version:
            # Not retried: every worker of a deployment loads the same LUSAI_MODEL_PATH package.
            m = analyzer.model
            raise InputError(
                f"model version {wanted_version} is not on this worker (it runs {m.name} {m.version}, "
                f"package {m.package_sha256[:12]})"
            )
        source = pydicom.dcmread(store.path(storage_key))
        analysis = analyzer.analyze(source)
        delivery_ids = save_result(job_id, analysis, source, settings=settings, store=store)
    except SoftTimeLimitExceeded:
        _fail_or_retry(self, job_id, "time limit exceeded", retry=True)
        return "timeout"
    except InputError as exc:
        _finish_failed(job_id, f"input rejected: {exc}")
        log.warning("job failed: unusable input", extra=ctx(job_id=job_id, reason=str(exc)))
        return "failed"
    except Exception as exc:
        log.exception("job error", extra=ctx(job_id=job_id))
        _fail_or_retry(self, job_id, f"{type(exc).__name__}: {exc}"[:2000], retry=True)
        return "error"
    if delivery_ids is None:
        log.info("job cancelled while running: result discarded", extra=ctx(job_id=job_id))
        return "cancelled"
    for delivery_id in delivery_ids:
        enqueue_delivery(delivery_id)
    log.info(
        "job succeeded",
        extra=ctx(job_id=job_id, score=analysis.findings.score, ms=round((time.perf_counter() - t0) * 1000)),
    )
    return "succeeded"


def _finish_failed(job_id: int, error: str) -> None:
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is not None and job.state != JobState.CANCELLED:
            job.state = JobState.FAILED
            job.error = error
            job.finished_at = datetime.now(UTC)


def _fail_or_retry(task: Task, job_id: int, error: str, *, retry: bool) -> None:
    settings = get_settings()
    with session_scope() as session:
        job = session.get(Job, job_id)
        if job is None or job.state == JobState.CANCELLED:
            return
        job.error = error
        if retry and job.attempts < settings.job_max_attempts:
            job.state = JobState.RETRYING
            job.enqueued_at = datetime.now(UTC)
            countdown = min(300, 10 * 2 ** (job.attempts - 1))
        else:
            job.state = JobState.FAILED
            job.finished_at = datetime.now(UTC)
            return
    task.apply_async(args=[job_id], countdown=countdown)


@app.task(name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def deliver(self: Task, delivery_id: int) -> str:
    """C-STORE one output object to its destination (outbox pattern with backoff and dead-letter)."""
    from workers.deliver import send_delivery

    settings = get_settings()
    outcome, retry_in = send_delivery(delivery_id, settings=settings, store=ObjectStore(settings.storage))
    if retry_in is not None:
        enqueue_delivery(delivery_id, countdown=retry_in)
    return outcome
