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
