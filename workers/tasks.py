"""Thin Celery tasks: load by ID, call the pure stages, save, chain onward.

Tasks take row IDs, never datasets, and are idempotent: outputs have UIDs derived from the source
instance and model version, the Result row is replaced, and a job that already succeeded is skipped,
so ``acks_late`` redelivery after a killed worker is safe. Each reads its process's runtime (the
database, store, queue and model) as ``self.runtime`` (:class:`workers.celery_app.LusaiTask`).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time

import pydicom
from celery.exceptions import SoftTimeLimitExceeded

from service.core import lifecycle, registry
from service.core.logs import ctx
from service.core.models import Job, JobState
from service.core.queue import ANALYZE_TASK, DELIVER_TASK, PREVIEWS_TASK
from service.core.runtime import Runtime
from service.core.storage import storage_full, storage_unavailable
from workers.celery_app import LusaiTask, app
from workers.results import SOURCE_VALUE_ERRORS, audit_outputs_of, save_previews, save_result

log = logging.getLogger(__name__)


def _claim(
    runtime: Runtime, job_id: int, worker_name: str | None = None
) -> tuple[str, str | None, lifecycle.Attempt] | None:
    """Mark the job running; None when there is nothing to do (done, cancelled, vanished, or
    another live worker holds it).

    Returns the storage key, the model version the job asked for (None: whatever is loaded) and
    the claim, which the transitions that end the attempt check. ``worker_name`` is the registry's
    name of this worker (Celery's node name), recorded on the job.
    """
    me = f"{socket.gethostname()}:{os.getpid()}"
    with runtime.db.session() as session:
        won = lifecycle.claim(session, job_id, me, worker_name=worker_name)
        if not won:
            job = session.get(Job, job_id)
            lost = (
                _dead_local_holder(job.worker) if job is not None and job.state == JobState.RUNNING else None
            )
            if job is None or lost is None:
                return None
            if job.attempts >= runtime.settings.job_max_attempts:  # it killed its worker every time
                lifecycle.fail(session, job_id, "worker lost on the last attempt")
                log.warning("job failed: worker lost on every attempt", extra=ctx(job_id=job_id))
                return None
            if not lifecycle.claim(session, job_id, me, lost_worker=lost, worker_name=worker_name):
                return None
            log.info("job taken over from a dead worker process", extra=ctx(job_id=job_id))
        job = session.get(Job, job_id)
        attempt = lifecycle.attempt_of(session, job_id)
        assert job is not None and attempt is not None
        return job.instance.storage_key, job.model_version, attempt


def _dead_local_holder(worker: str | None) -> str | None:
    """``worker`` when it names a process of this host that no longer exists, else None.

    Celery redelivers the message of a killed pool process at once (``reject_on_worker_lost``);
    the job is still RUNNING under the dead process's name. Holders on other hosts cannot be
    checked from here: the recovery sweep frees those after ``LUSAI_STALE_JOB_AFTER``.
    """
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return worker
    except OSError:  # exists but not ours to signal: alive
        return None
    return None


@app.task(name=ANALYZE_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def analyze(self: LusaiTask, job_id: int) -> str:
    worker_name = self.request.hostname  # Celery's node name (None when called directly)
    outcome = _analyze(self, job_id, worker_name)
    if worker_name and outcome in _COUNTED:
        try:
            with self.runtime.db.session() as session:
                registry.count_job(session, worker_name, failed=outcome != "succeeded")
        except Exception as exc:  # bookkeeping: never the job's outcome
            log.debug("worker counters not updated", extra=ctx(error=type(exc).__name__))
    return outcome


#: Outcomes the worker registry counts (``jobs_done`` for "succeeded", ``jobs_failed`` else).
_COUNTED = frozenset({"succeeded", "failed", "error", "timeout"})


def _analyze(self: LusaiTask, job_id: int, worker_name: str | None) -> str:
    runtime = self.runtime
    claimed = _claim(runtime, job_id, worker_name)
    if claimed is None:
        return "skipped"
    storage_key, wanted_version, attempt = claimed
    t0 = time.perf_counter()
    try:
        from workers.pipeline import InputError

        analyzer = runtime.analyzer
        if wanted_version and wanted_version != analyzer.model.version:
            # Not retried: every worker of a deployment loads the same LUSAI_MODEL_PATH package.
            m = analyzer.model
            raise InputError(
                f"model version {wanted_version} is not on this worker (it runs {m.name} {m.version}, "
                f"package {m.package_sha256[:12]})"
            )
        source = pydicom.dcmread(runtime.store.path(storage_key))
        try:
            analysis = analyzer.analyze(source)
        except SOURCE_VALUE_ERRORS as exc:
            error, raised_by_pydicom = _describe(exc)
            if not raised_by_pydicom:
                raise  # lusai's own error: logged with its traceback, retried
            # A header value of the source pydicom cannot convert (a length that does not fit its
            # VR, an unknown VR): the same on every attempt (found by bench/chaos/fuzz.py).
            raise InputError(f"a header value of the source cannot be read ({error})") from exc
        saved = save_result(job_id, analysis, source, runtime=runtime, attempt=attempt)
    except SoftTimeLimitExceeded:
        _fail_or_retry(self, job_id, "time limit exceeded", attempt)
        return "timeout"
    except InputError as exc:
        _finish_failed(runtime, job_id, f"input rejected: {exc}", attempt)
        log.warning("job failed: unusable input", extra=ctx(job_id=job_id, reason=str(exc)))
        return "failed"
    except Exception as exc:
        if storage_full(exc):
            _retry_when_space(self, job_id, attempt, "storage full: waiting for space")
            return "waiting for space"
        if storage_unavailable(exc):
            _retry_when_space(
                self, job_id, attempt, f"storage unavailable ({_errno_name(exc)}): waiting for it"
            )
            return "waiting for storage"
        error, quotes_data = _describe(exc)
        if quotes_data:  # no traceback: its last line would quote the value
            log.error("job error", extra=ctx(job_id=job_id, error=error))
        else:
            log.exception("job error", extra=ctx(job_id=job_id))
        _fail_or_retry(self, job_id, error, attempt)
        return "error"
    if saved is None:
        log.info(
            "result discarded: the job was cancelled, or re-queued as its worker was lost",
            extra=ctx(job_id=job_id, attempt=attempt.number),
        )
        return "cancelled"
    for delivery_id in saved.delivery_ids:
        runtime.queue.enqueue_delivery(delivery_id)
    try:  # behind the deliveries on their queue: PACS never waits for the REST API's pictures
        runtime.queue.enqueue_previews(saved.result_id)
    except Exception as exc:  # the job has succeeded; its previews answer 404 until a re-run
        log.warning("previews not queued", extra=ctx(job_id=job_id, error=type(exc).__name__))
    log.info(
        "job succeeded",
        extra=ctx(job_id=job_id, score=analysis.findings.score, ms=round((time.perf_counter() - t0) * 1000)),
    )
    return "succeeded"


@app.task(name=PREVIEWS_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def previews(self: LusaiTask, result_id: int) -> str:
    """The dicom3tools audit of a result's outputs (LUSAI_OUTPUT_VALIDATION=background), then the
    REST API's pictures (PNG key frame, GIF/WebP loops); idempotent."""
    try:
        audit_outputs_of(result_id, runtime=self.runtime)
    except Exception as exc:  # the audit is recorded as pending (NULL); the previews still come
        error, _ = _describe(exc)
        log.warning("output audit not run", extra=ctx(result_id=result_id, error=error))
    try:
        return "stored" if save_previews(result_id, runtime=self.runtime) else "gone"
    except Exception as exc:  # never retried: its previews answer 404 until a re-run
        error, _ = _describe(exc)
        log.warning("previews not stored", extra=ctx(result_id=result_id, error=error))
        return "failed"


#: Libraries whose exception messages quote DICOM element values, which can be patient data.
_DICOM_LIBRARIES = frozenset({"pydicom", "highdicom", "pynetdicom"})


def _describe(exc: BaseException) -> tuple[str, bool]:
    """The error as a job records it, and whether its message was left out: an exception raised
    inside a DICOM library is named by type and module only, since its message may quote a value
    of the source (a name, an ID); any other keeps its message for whoever reads the job."""
    tb, module = exc.__traceback__, ""
    while tb is not None:
        module, tb = str(tb.tb_frame.f_globals.get("__name__", "")), tb.tb_next
    if module.split(".")[0] in _DICOM_LIBRARIES:
        return f"{type(exc).__name__} in {module}", True
    return f"{type(exc).__name__}: {exc}", False


def _finish_failed(runtime: Runtime, job_id: int, error: str, attempt: lifecycle.Attempt) -> None:
    with runtime.db.session() as session:
        lifecycle.fail(session, job_id, error, attempt=attempt)


def _retry_when_space(task: LusaiTask, job_id: int, attempt: lifecycle.Attempt, why: str) -> None:
    """The storage failed the job, not the job itself (full, or its mount gone): retried without
    spending an attempt, for as long as :data:`lifecycle.STORAGE_FULL_RETRY_FOR`."""
    runtime = task.runtime
    with runtime.db.session() as session:
        countdown = lifecycle.retry_when_space(session, job_id, why, attempt=attempt)
    log.warning("job waits for the storage", extra=ctx(job_id=job_id, reason=why, retry_in_s=countdown))
    if countdown is not None:  # routed as a new job (LUSAI_ANALYZE_ROUTING)
        runtime.queue.enqueue_analysis(job_id, countdown=countdown)


def _fail_or_retry(task: LusaiTask, job_id: int, error: str, attempt: lifecycle.Attempt) -> None:
    runtime = task.runtime
    with runtime.db.session() as session:
        countdown = lifecycle.fail_or_retry(
            session, job_id, error, max_attempts=runtime.settings.job_max_attempts, attempt=attempt
        )
    if countdown is not None:  # routed as a new job (LUSAI_ANALYZE_ROUTING)
        runtime.queue.enqueue_analysis(job_id, countdown=countdown)


@app.task(name=DELIVER_TASK, bind=True, acks_late=True, reject_on_worker_lost=True)
def deliver(self: LusaiTask, delivery_id: int) -> str:
    """C-STORE one output object to its destination (outbox pattern with backoff and dead-letter)."""
    from workers.deliver import send_delivery

    runtime = self.runtime
    outcome, retry_in = send_delivery(delivery_id, runtime=runtime)
    if retry_in is not None:
        runtime.queue.enqueue_delivery(delivery_id, countdown=retry_in)
    return outcome


def _errno_name(exc: BaseException) -> str:
    """The symbolic errno of the storage error (EIO, ESTALE ...): no path, no message."""
    current: BaseException | None = exc
    seen: set[int] = set()
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno is not None:
            return errno.errorcode.get(current.errno, str(current.errno))
        current = current.__cause__ or current.__context__
    return "OSError"
