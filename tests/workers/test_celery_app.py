"""The worker's runtime: built per process by worker_process_init, read by tasks as ``self.runtime``."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from service.core.model_package import PackageError
from service.core.runtime import Runtime
from tests.conftest import REPO
from workers import celery_app
from workers.celery_app import LusaiTask, WorkerRuntime


@pytest.fixture
def no_process_runtime() -> Iterator[None]:
    """No runtime installed before the test, and the one it leaves released afterwards."""
    LusaiTask.release()
    yield
    LusaiTask.release()


def test_the_app_does_not_import_its_tasks() -> None:
    """The tasks import the app; the app reaches them only through Celery's ``include``."""
    code = (
        "import sys, workers.celery_app as c; "
        "assert 'workers.tasks' not in sys.modules and 'workers.pipeline' not in sys.modules; "
        "assert 'workers.tasks' in c.app.conf.include; "
        "print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_every_task_reads_the_process_runtime(runtime: Runtime, no_process_runtime: None) -> None:
    from workers import tasks

    assert isinstance(tasks.analyze, LusaiTask) and isinstance(tasks.deliver, LusaiTask)
    mine = LusaiTask.use(WorkerRuntime.from_settings(runtime.settings))
    assert tasks.analyze.runtime is mine and tasks.deliver.runtime is mine
    # Nothing to do for rows that are not there: both answer from this process's database.
    assert tasks.analyze(12345) == "skipped"
    assert tasks.deliver(12345) == "skipped"


def test_without_a_process_runtime_a_task_builds_one_from_the_environment(
    runtime: Runtime, no_process_runtime: None
) -> None:
    from workers import tasks

    built = tasks.deliver.runtime
    assert isinstance(built, WorkerRuntime) and built.settings.data_dir == runtime.settings.data_dir
    assert tasks.analyze.runtime is built  # one per process, shared by every task


def test_release_closes_and_forgets(runtime: Runtime, no_process_runtime: None) -> None:
    mine = LusaiTask.use(WorkerRuntime.from_settings(runtime.settings))
    mine.queue.enqueue_analysis(1)
    LusaiTask.release()
    assert LusaiTask._process_runtime is None
    assert mine.db.engine.pool.checkedout() == 0


def test_process_start_builds_the_runtime_and_survives_a_model_that_will_not_load(
    runtime: Runtime,
    no_process_runtime: None,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    missing = runtime.settings.data_dir / "no-such-package"
    monkeypatch.setenv("LUSAI_MODEL_PATH", str(missing))
    caplog.set_level(logging.ERROR, logger=celery_app.__name__)
    celery_app._start_process()
    started = LusaiTask._process_runtime
    assert started is not None and started.settings.model_path == missing
    assert "model could not be loaded" in caplog.text  # logged; the job will fail with the reason
    with pytest.raises(PackageError):  # tried again on use: the task fails the job with the reason
        started.analyzer  # noqa: B018


def test_only_a_worker_on_the_analyze_queue_needs_the_model() -> None:
    def app(consume_from: dict[str, object] | None) -> object:
        return SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=consume_from)))

    assert celery_app.consumes_analyze(app({"analyze": None, "deliver": None}))
    assert not celery_app.consumes_analyze(app({"deliver": None}))


def test_a_worker_on_a_device_queue_needs_the_model_too() -> None:
    def app(consume_from: dict[str, object]) -> object:
        return SimpleNamespace(amqp=SimpleNamespace(queues=SimpleNamespace(consume_from=consume_from)))

    assert celery_app.consumes_analyze(app({"analyze.gpu": None}))
    assert celery_app.consumes_analyze(app({"analyze.cpu": None, "deliver": None}))


@pytest.mark.parametrize(
    ("queues", "device_queue"), [(["analyze", "deliver"], "analyze.cpu"), (["deliver"], None)]
)
def test_the_worker_follows_its_device_registers_and_marks_itself_stopped(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, queues: list[str], device_queue: str | None
) -> None:
    """celeryd_after_setup in the main process: the device's queue added to a worker on analyze,
    LUSAI_DEVICE fixed for the pool processes, a registry row heartbeating; worker_shutdown marks
    it stopped."""
    import os
    import time

    from celery import Celery
    from sqlalchemy import select

    from service.core.models import Worker
    from service.core.queue import celery_config

    monkeypatch.setenv("LUSAI_DEVICE", "auto")
    monkeypatch.setenv("LUSAI_HEARTBEAT_INTERVAL", "0.2")
    monkeypatch.setattr("workers.infer.device.nvidia_present", lambda: False)
    app = Celery("test-worker")
    app.conf.update(celery_config(runtime.settings))
    app.amqp.queues.select(queues)
    name = "lusai-9-test@testhost"
    celery_app._register(sender=name, instance=SimpleNamespace(app=app, concurrency=3))
    try:
        expected = [*queues, *([device_queue] if device_queue else [])]
        assert celery_app.consumed(app) == expected
        assert os.environ["LUSAI_DEVICE"] == ("cpu" if device_queue else "auto")
        deadline = time.monotonic() + 10
        row = None
        while row is None and time.monotonic() < deadline:
            with runtime.db.session() as s:
                row = s.scalars(select(Worker).where(Worker.name == name)).one_or_none()
            time.sleep(0.05)
        assert row is not None, "not registered"
        assert (row.queues, row.device, row.concurrency, row.pid) == (expected, "cpu", 3, os.getpid())
        assert row.stopped_at is None
    finally:
        celery_app._unregister()
    with runtime.db.session() as s:
        assert s.scalars(select(Worker.stopped_at).where(Worker.name == name)).one() is not None
