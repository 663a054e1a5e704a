"""The Celery tasks called directly, as a worker process runs them, on a throw-away runtime with the
shipped model and tiny phantom cines: each outcome of ``analyze`` (succeeded, skipped, failed,
retried, cancelled), the take-over of a job whose worker process died, and ``deliver``."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.valuerep
import pytest
from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select, update

from service.core import lifecycle
from service.core.ingest import ingest_file
from service.core.model_package import DEFAULT_PACKAGE, load_package
from service.core.models import Delivery, DeliveryState, Job, JobState, Result
from service.core.queue import DELIVER_TASK, PREVIEWS_TASK
from service.core.runtime import Runtime
from service.core.settings import Destination
from tests.conftest import broker_messages, free_port
from tests.factories import phantom_cine_file, save, us_cine
from tests.rows import get_row, stored_delivery
from workers import tasks
from workers.celery_app import LusaiTask, WorkerRuntime
from workers.domain import Analysis

HOST = socket.gethostname()


@pytest.fixture
def worker(runtime: Runtime) -> Iterator[WorkerRuntime]:
    """This process as a worker process: its own worker runtime (and model) on the test's database."""
    yield LusaiTask.use(WorkerRuntime.from_settings(runtime.settings))
    LusaiTask.release()


def _job(runtime: Runtime, path: Path) -> int:
    """Receive ``path`` as the SCP would: stored, indexed, and a QUEUED job for it."""
    tmp = runtime.store.new_temp()
    tmp.write_bytes(path.read_bytes())
    job_id = ingest_file(tmp, calling_ae=None, runtime=runtime).job_id
    assert job_id is not None
    return job_id


def _phantom_job(runtime: Runtime, tmp_path: Path) -> int:
    return _job(runtime, phantom_cine_file(tmp_path / "cine.dcm", frames=4))


def _set(runtime: Runtime, job_id: int, **values: Any) -> None:
    """Put the job where the test starts from (a direct write, not a transition)."""
    with runtime.db.session() as s:
        job = s.get(Job, job_id)
        assert job is not None
        for name, value in values.items():
            setattr(job, name, value)


def _results(runtime: Runtime) -> int:
    with runtime.db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Result)) or 0)


def _dead_pid() -> int:
    """The PID of a process of this host that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_a_job_runs_once_and_a_finished_one_is_skipped(worker: WorkerRuntime, tmp_path: Path) -> None:
    job_id = _phantom_job(worker, tmp_path)
    assert tasks.analyze(job_id) == "succeeded"
    job = get_row(worker, Job, job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 1
    assert job.worker == f"{HOST}:{os.getpid()}" and job.model_version == worker.analyzer.model.version
    assert _results(worker) == 1
    # the previews are a task of their own (queued), rendered from the stored source and SEG
    with worker.db.session() as s:
        result = s.scalars(select(Result)).one()
    assert result.preview_png_key is None
    [message] = [m for m in broker_messages(worker.settings) if m.task == PREVIEWS_TASK]
    assert message.args == [result.id]
    assert tasks.previews(result.id) == "stored"
    with worker.db.session() as s:
        result = s.scalars(select(Result)).one()
        keys = (result.preview_png_key, result.preview_gif_key, result.preview_webp_key)
    assert all(keys) and result.preview_error is None
    assert all(worker.store.path(k).is_file() for k in keys if k)
    assert tasks.previews(result.id + 1) == "gone"
    # acks_late redelivers a message whose worker died after finishing: nothing is done twice.
    assert tasks.analyze(job_id) == "skipped"
    assert get_row(worker, Job, job_id).attempts == 1 and _results(worker) == 1


def test_a_result_with_a_destination_queues_its_deliveries(runtime: Runtime, tmp_path: Path) -> None:
    pacs = runtime.settings.model_copy(update={"default_destination": Destination.parse("PACS@127.0.0.1:1")})
    worker = LusaiTask.use(WorkerRuntime.from_settings(pacs))
    try:
        job_id = _phantom_job(worker, tmp_path)
        assert tasks.analyze(job_id) == "succeeded"
        with worker.db.session() as s:
            deliveries = sorted(s.scalars(select(Delivery.id)))
        assert deliveries  # SEG and SR (and whatever else the settings send)
        messages = broker_messages(pacs)
        sent = [m.args[0] for m in messages if m.task == DELIVER_TASK]
        assert sorted(sent) == deliveries
        # the previews are a message of their own on the same queue, sent after the deliveries
        assert [m.task for m in messages].count(PREVIEWS_TASK) == 1
    finally:
        LusaiTask.release()


def test_unusable_input_fails_at_once_with_the_reason(worker: WorkerRuntime, tmp_path: Path) -> None:
    blank = save(us_cine(np.zeros((3, 64, 64), np.uint8)), tmp_path / "blank.dcm")  # valid DICOM, no lung
    job_id = _job(worker, blank)
    assert tasks.analyze(job_id) == "failed"
    job = get_row(worker, Job, job_id)
    assert job.state == JobState.FAILED and job.attempts == 1  # not retried: it would fail again
    assert job.error is not None and job.error.startswith("input rejected: ")
    assert _results(worker) == 0


@pytest.mark.parametrize("case", ["bad-date", "no-date", "PatientName-as-FD"])
def test_a_source_header_the_outputs_cannot_carry_fails_at_once(
    worker: WorkerRuntime, tmp_path: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by bench/chaos/fuzz.py: a corrupt StudyDate (ValueError in the SR), a missing one
    (AttributeError) or a name whose VR is wrong (BytesLengthException) was retried three times as
    a transient error, the exception's message (quoting the value) in the job row and the log."""
    dates = {"bad-date": "20!6", "no-date": None, "PatientName-as-FD": "20260101"}
    cine = phantom_cine_file(
        tmp_path / "cine.dcm", frames=4, StudyDate=dates[case], PatientName="SECRET^NAME"
    )
    if case == "PatientName-as-FD":  # 12 bytes of name read as 8-byte floats
        data = cine.read_bytes()
        cine.write_bytes(data.replace(b"\x10\x00\x10\x00PN\x0c\x00", b"\x10\x00\x10\x00FD\x0c\x00"))
    job_id = _job(worker, cine)
    assert tasks.analyze(job_id) == "failed"
    job = get_row(worker, Job, job_id)
    assert job.state == JobState.FAILED and job.attempts == 1
    assert job.error is not None and job.error.startswith("input rejected: the source's header")
    assert _results(worker) == 0
    ours = "\n".join(  # pydicom's own logger is silenced in production (configure_libraries)
        f"{r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if r.name.startswith(("workers", "service"))
    )
    for quoted in ("20!6", "SECRET"):
        assert quoted not in job.error and quoted not in ours


def test_worker_fails_a_job_for_another_model_version(worker: WorkerRuntime, tmp_path: Path) -> None:
    job_id = _phantom_job(worker, tmp_path)
    _set(worker, job_id, model_version="9.9.9")
    assert tasks.analyze(job_id) == "failed"  # at once: every worker of a deployment runs one package
    shipped = load_package(DEFAULT_PACKAGE)
    job = get_row(worker, Job, job_id)
    assert job.state == JobState.FAILED and job.attempts == 1
    assert job.error is not None and "model version 9.9.9 is not on this worker" in job.error
    assert f"{shipped.name} {shipped.version}, package {shipped.package_sha256[:12]}" in job.error


@pytest.mark.parametrize(
    ("raised", "outcome", "error"),
    [
        (RuntimeError("CUDA out of memory"), "error", "RuntimeError: CUDA out of memory"),
        (SoftTimeLimitExceeded(), "timeout", "time limit exceeded"),
    ],
)
def test_a_transient_failure_is_retried_with_backoff(
    worker: WorkerRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    raised: Exception,
    outcome: str,
    error: str,
) -> None:
    def analyze(_source: pydicom.Dataset) -> Analysis:
        raise raised

    retries: list[tuple[int, float]] = []
    monkeypatch.setattr(worker.analyzer, "analyze", analyze)
    job_id = _phantom_job(worker, tmp_path)
    # the retry is sent as a new job is, through the routing (LUSAI_ANALYZE_ROUTING)
    monkeypatch.setattr(
        worker.queue, "enqueue_analysis", lambda j, countdown=0: retries.append((j, countdown))
    )
    assert tasks.analyze(job_id) == outcome
    job = get_row(worker, Job, job_id)
    assert (job.state, job.error) == (JobState.RETRYING, error)
    assert retries == [(job_id, lifecycle.JOB_BACKOFF.delay(1))]
    # The last attempt fails the job instead.
    _set(worker, job_id, attempts=worker.settings.job_max_attempts - 1)
    assert tasks.analyze(job_id) == outcome
    assert get_row(worker, Job, job_id).state == JobState.FAILED and len(retries) == 1


def test_an_error_raised_inside_pydicom_is_recorded_without_its_message(
    worker: WorkerRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """pydicom's messages quote element values: the job's error and the log name only the type
    (and a value pydicom cannot convert is the source's fault: failed at once, not retried)."""

    def analyze(_source: pydicom.Dataset) -> Analysis:
        pydicom.valuerep.DA("PHI-MARKER-19")  # raises ValueError quoting the value
        raise AssertionError("unreachable")

    monkeypatch.setattr(worker.analyzer, "analyze", analyze)
    job_id = _phantom_job(worker, tmp_path)
    monkeypatch.setattr(worker.queue, "enqueue_analysis", lambda *a, **kw: None)
    with caplog.at_level("INFO"):
        assert tasks.analyze(job_id) == "failed"
    job = get_row(worker, Job, job_id)
    cause = "ValueError in pydicom.valuerep"
    assert job.state == JobState.FAILED
    assert job.error == f"input rejected: a header value of the source cannot be read ({cause})"
    logged = "\n".join(f"{r.getMessage()} {r.__dict__} {r.exc_text or ''}" for r in caplog.records)
    assert "PHI-" not in logged and "unusable input" in logged


def test_a_header_value_pydicom_cannot_convert_fails_the_job_at_once(
    worker: WorkerRuntime, tmp_path: Path
) -> None:
    """Regression (bench/chaos/fuzz.py at full size): a FrameTime (or region spacing) whose length
    does not fit its VR raised BytesLengthException inside pydicom while the worker read it; the
    job was retried as transient (3 attempts, minutes of backoff) and failed without saying why."""
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    ds = pydicom.dcmread(phantom_cine_file(tmp_path / "cine.dcm", frames=4))
    frame_time = Tag(0x00181063)
    ds._dict[frame_time] = RawDataElement(frame_time, "US", 3, b"\x01\x02\x03", 0, False, True)
    ds.save_as(tmp_path / "bad.dcm")
    job_id = _job(worker, tmp_path / "bad.dcm")
    assert tasks.analyze(job_id) == "failed"
    job = get_row(worker, Job, job_id)
    assert job.state == JobState.FAILED and job.attempts == 1
    cause = "BytesLengthException in pydicom.hooks"
    assert job.error == f"input rejected: a header value of the source cannot be read ({cause})"


def _storage_errors(kind: str) -> list[OSError]:
    from service.core.storage import StorageFull

    if kind == "full":
        return [OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))] * 2 + [StorageFull("no space")] * 3
    code = {"EIO": errno.EIO, "ESTALE": errno.ESTALE}[kind]
    return [OSError(code, os.strerror(code))] * 5


@pytest.mark.parametrize(
    ("kind", "outcome", "error"),
    [
        ("full", "waiting for space", "storage full"),
        ("EIO", "waiting for storage", "storage unavailable (EIO): waiting for it"),
        ("ESTALE", "waiting for storage", "storage unavailable (ESTALE): waiting for it"),
    ],
)
def test_a_storage_failure_never_fails_a_job_it_waits_for_the_storage(
    worker: WorkerRuntime,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    kind: str,
    outcome: str,
    error: str,
) -> None:
    """Regression (bench/chaos/faults.py disk_full): a job whose outputs met a full disk spent an
    attempt each time and went FAILED after LUSAI_JOB_MAX_ATTEMPTS, minutes into the outage; the
    administrator who freed space found a backlog of failed jobs to re-run by hand. The shared
    (NFS/RWX) storage gone mid-job (EIO, ESTALE) is the host's failure as well (issue 15)."""
    scheduled: list[float] = []
    real = worker.store.put_bytes
    failing = _storage_errors(kind)

    def put_bytes(*args: Any, **kwargs: Any) -> tuple[str, str, int]:
        if failing:
            raise failing.pop()
        return real(*args, **kwargs)

    monkeypatch.setattr(worker.store, "put_bytes", put_bytes)
    job_id = _phantom_job(worker, tmp_path)
    monkeypatch.setattr(worker.queue, "enqueue_analysis", lambda _j, countdown=0: scheduled.append(countdown))
    for _ in range(5):  # more failures than LUSAI_JOB_MAX_ATTEMPTS
        assert tasks.analyze(job_id) == outcome
        job = get_row(worker, Job, job_id)
        assert job.state == JobState.RETRYING and job.attempts == 0 and job.error is not None
        assert job.error.startswith(error)
    assert len(scheduled) == 5 and all(30 <= c <= lifecycle.JOB_BACKOFF.cap_s for c in scheduled)
    assert tasks.analyze(job_id) == "succeeded"  # room again, or the mount back
    job = get_row(worker, Job, job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 1 and _results(worker) == 1


def test_a_job_cancelled_while_it_runs_keeps_nothing(
    worker: WorkerRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _phantom_job(worker, tmp_path)
    real = worker.analyzer.analyze

    def analyze(source: pydicom.Dataset) -> Analysis:
        with worker.db.session() as s:  # the API cancels it meanwhile
            assert lifecycle.cancel(s, job_id)
        return real(source)

    monkeypatch.setattr(worker.analyzer, "analyze", analyze)
    assert tasks.analyze(job_id) == "cancelled"
    assert get_row(worker, Job, job_id).state == JobState.CANCELLED and _results(worker) == 0


def test_a_job_taken_from_its_worker_while_it_runs_keeps_nothing(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The registry declared this worker lost mid-analysis (its host cut off): the sweep re-queued
    the job and another worker claimed it. This one comes back and finishes: its result is
    discarded, nothing stored, nothing sent; the other's claim stands."""
    pacs = runtime.settings.model_copy(update={"default_destination": Destination.parse("PACS@127.0.0.1:1")})
    worker = LusaiTask.use(WorkerRuntime.from_settings(pacs))
    try:
        _taken_while_running(worker, pacs, tmp_path, monkeypatch)
    finally:
        LusaiTask.release()


def _taken_while_running(
    runtime: WorkerRuntime, pacs: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job_id = _phantom_job(runtime, tmp_path)
    real = runtime.analyzer.analyze

    def analyze(source: pydicom.Dataset) -> Analysis:
        with runtime.db.session() as s:  # what requeue_lost_workers and the other worker's claim do
            s.execute(update(Job).where(Job.id == job_id).values(state=JobState.QUEUED))
            assert lifecycle.claim(s, job_id, "elsewhere:7", worker_name="other@elsewhere")
        return real(source)

    monkeypatch.setattr(runtime.analyzer, "analyze", analyze)
    assert tasks.analyze(job_id) == "cancelled"
    job = get_row(runtime, Job, job_id)
    assert (job.state, job.worker, job.attempts) == (JobState.RUNNING, "elsewhere:7", 2)
    assert _results(runtime) == 0
    with runtime.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 0
    assert [m for m in broker_messages(pacs) if m.task in (DELIVER_TASK, PREVIEWS_TASK)] == []


def test_a_job_held_by_a_dead_process_of_this_host_is_taken_over(
    worker: WorkerRuntime, tmp_path: Path
) -> None:
    job_id = _phantom_job(worker, tmp_path)
    dead = f"{HOST}:{_dead_pid()}"
    _set(worker, job_id, state=JobState.RUNNING, worker=dead, attempts=1, started_at=datetime.now(UTC))
    assert tasks.analyze(job_id) == "succeeded"
    job = get_row(worker, Job, job_id)
    assert job.state == JobState.SUCCEEDED and job.attempts == 2 and job.worker == f"{HOST}:{os.getpid()}"


def test_a_dead_holder_on_its_last_attempt_fails_the_job(worker: WorkerRuntime, tmp_path: Path) -> None:
    """The cine killed its worker every time (out of memory): stop trying."""
    job_id = _phantom_job(worker, tmp_path)
    attempts = worker.settings.job_max_attempts
    _set(worker, job_id, state=JobState.RUNNING, worker=f"{HOST}:{_dead_pid()}", attempts=attempts)
    assert tasks.analyze(job_id) == "skipped"
    job = get_row(worker, Job, job_id)
    assert (job.state, job.error, job.attempts) == (
        JobState.FAILED,
        "worker lost on the last attempt",
        attempts,
    )


def test_a_job_held_by_a_live_worker_is_left_to_it(worker: WorkerRuntime, tmp_path: Path) -> None:
    job_id = _phantom_job(worker, tmp_path)
    for holder in (f"{HOST}:{os.getppid()}", f"elsewhere:{_dead_pid()}"):  # alive; not checkable here
        _set(worker, job_id, state=JobState.RUNNING, worker=holder, attempts=1)
        assert tasks.analyze(job_id) == "skipped"
        job = get_row(worker, Job, job_id)
        assert (job.state, job.worker, job.attempts) == (JobState.RUNNING, holder, 1)


def test_dead_local_holder_names_only_a_gone_process_of_this_host() -> None:
    dead = _dead_pid()
    assert tasks._dead_local_holder(f"{HOST}:{dead}") == f"{HOST}:{dead}"
    for alive_or_unknown in (
        None,
        "",
        "no-pid",
        f"{HOST}:abc",
        f"{HOST}:{os.getpid()}",  # this very process
        f"{HOST}:{os.getppid()}",
        f"other-host:{dead}",  # the recovery sweep frees those after LUSAI_STALE_JOB_AFTER
    ):
        assert tasks._dead_local_holder(alive_or_unknown) is None


def test_deliver_schedules_the_next_try_when_the_peer_is_down(worker: WorkerRuntime, tmp_path: Path) -> None:
    delivery_id, _ = stored_delivery(worker, tmp_path, f"PACS@127.0.0.1:{free_port()}")
    assert tasks.deliver(delivery_id) == "retrying"
    d = get_row(worker, Delivery, delivery_id)
    assert d.state == DeliveryState.RETRYING and d.attempts == 1
    [message] = broker_messages(worker.settings)
    assert (message.task, message.args) == (DELIVER_TASK, [delivery_id])
    assert message.eta is not None  # after the backoff, not at once


def test_deliver_skips_a_delivered_object(worker: WorkerRuntime, tmp_path: Path) -> None:
    delivery_id, _ = stored_delivery(worker, tmp_path, "PACS@127.0.0.1:1", state=DeliveryState.DELIVERED)
    assert tasks.deliver(delivery_id) == "skipped"
    assert broker_messages(worker.settings) == []
