"""The Celery application the workers run (``celery -A workers.celery_app worker``), and each worker
process's runtime.

The tasks (:mod:`workers.tasks`) import this module, never the reverse: Celery loads them through
``include`` when the worker starts. A pool process builds its :class:`WorkerRuntime` in
``worker_process_init``, after the fork, so no database or broker connection is shared between
processes, and its tasks read it as ``self.runtime`` (:class:`LusaiTask`).

The main process finds the device the worker analyses on, adds that device's queue
(``analyze.gpu`` or ``analyze.cpu``) to a worker that consumes ``analyze``, registers the worker
in the registry and heartbeats from a thread until a clean shutdown marks it stopped
(:mod:`service.core.registry`).
"""

from __future__ import annotations

import logging
import os
import socket
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

from celery import Celery, Task
from celery.signals import (
    celeryd_after_setup,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
    worker_shutdown,
)

from service.core.db import Database
from service.core.libraries import configure_libraries
from service.core.logs import configure_logging, ctx
from service.core.queue import ANALYZE_QUEUES, celery_config, worker_queues
from service.core.registry import Heartbeat, Identity
from service.core.runtime import Runtime
from service.core.settings import Settings

if TYPE_CHECKING:
    from workers.pipeline import Analyzer

log = logging.getLogger(__name__)


class WorkerRuntime(Runtime):
    """A worker process's runtime: the core's, plus the model when the process analyses."""

    @cached_property
    def analyzer(self) -> Analyzer:
        """The network, loaded once per process (a failed load is tried again on the next use)."""
        from workers.pipeline import Analyzer

        return Analyzer(package=self.settings.model_path, device=self.settings.device)


class LusaiTask(Task):
    """The base class of lusai's tasks: ``self.runtime`` is the runtime of the process they run in.

    Celery's task guide ("Custom task classes") recommends a base class for resources a task keeps
    per process: a task is instantiated once per process, and its property is where the guide keeps
    a database connection. The runtime is built by ``worker_process_init`` in each pool process
    (:func:`_start_process`; the prefork and solo pools send it); a task run without that signal (the
    threads pool, a direct call) builds it on first use. Tests install their own with :meth:`use`.
    """

    _process_runtime: ClassVar[WorkerRuntime | None] = None

    @property
    def runtime(self) -> WorkerRuntime:
        runtime = LusaiTask._process_runtime
        if runtime is None:
            runtime = LusaiTask.use(WorkerRuntime.from_settings(Settings()))
        return runtime

    @staticmethod
    def use(runtime: WorkerRuntime) -> WorkerRuntime:
        """Make ``runtime`` this process's (returned, for chaining)."""
        LusaiTask._process_runtime = runtime
        return runtime

    @staticmethod
    def release() -> None:
        """Close and forget this process's runtime (at process shutdown, and after a test)."""
        runtime, LusaiTask._process_runtime = LusaiTask._process_runtime, None
        if runtime is not None:
            runtime.close()


def create_app() -> Celery:
    settings = Settings()
    configure_logging(settings.log_format, settings.log_level)
    app = Celery("lusai", include=["workers.tasks"], task_cls=LusaiTask)
    app.conf.update(celery_config(settings))
    return app


app = create_app()


def consumes_analyze(celery: Celery) -> bool:
    """Whether this worker consumes an analysis queue (``--queues``: analyze, analyze.gpu,
    analyze.cpu); a deliver-only one needs no model.

    Set in the main process before the pool forks, so pool processes read the same answer.
    """
    return any(q in ANALYZE_QUEUES for q in consumed(celery))


def consumed(celery: Celery) -> list[str]:
    """The names of the queues this worker consumes."""
    queues = celery.amqp.queues
    return list(getattr(queues, "consume_from", None) or queues)


#: The main process's heartbeat (None before the worker is set up, and in pool processes' use).
_heartbeat: Heartbeat | None = None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lusai")
    except PackageNotFoundError:
        return "unknown"


@celeryd_after_setup.connect
def _register(sender: str, instance: Any, **_: Any) -> None:
    """Main process, after ``--queues`` and before the pool starts: find the device (the pool
    processes then load the model on it: ``LUSAI_DEVICE`` set), consume its analysis queue too,
    and register in the worker registry with a heartbeat thread."""
    global _heartbeat
    from workers.infer.device import detect_device

    settings = Settings()
    device, gpu_name = "cpu", None
    if consumes_analyze(instance.app):
        device, gpu_name = detect_device(settings.device)
        os.environ["LUSAI_DEVICE"] = device
        have = consumed(instance.app)
        for queue in worker_queues(have, device):
            if queue not in have:
                instance.app.amqp.queues.select_add(queue)
    me = Identity(
        name=sender,
        host=socket.gethostname(),
        pid=os.getpid(),
        queues=tuple(consumed(instance.app)),
        device=device,
        gpu_name=gpu_name,
        concurrency=int(getattr(instance, "concurrency", 1) or 1),
        version=_version(),
    )
    log.info(
        "worker device", extra=ctx(worker=sender, device=device, gpu=gpu_name, queues=",".join(me.queues))
    )
    _heartbeat = Heartbeat(Database(settings.db_url, pooled=False), me, settings.heartbeat_interval)
    _heartbeat.start()


@worker_shutdown.connect
def _unregister(**_: Any) -> None:
    """A clean shutdown (its jobs finished): the registry marks the worker stopped."""
    global _heartbeat
    heartbeat, _heartbeat = _heartbeat, None
    if heartbeat is not None:
        heartbeat.stop()
        heartbeat.db.dispose()


@worker_init.connect
def _configure_libraries(**_: Any) -> None:
    """Library switches once at worker start (pool processes inherit them), not on import."""
    configure_libraries()


@worker_init.connect
def _verify_model_package(sender: Any = None, **_: Any) -> None:
    """Refuse to start, in the main process before any pool process, on a bad model package.

    One clear log line and exit code 1, instead of pool processes that fail every job (or a restart
    loop of tracebacks). ``lusai worker`` checks the same before it starts Celery at all.
    """
    from service.core.model_package import DEFAULT_PACKAGE, PackageError, load_package

    if sender is not None and not consumes_analyze(sender.app):
        return
    try:
        pkg = load_package(Settings().model_path or DEFAULT_PACKAGE)
    except PackageError as exc:
        log.error("worker not started: bad model package (LUSAI_MODEL_PATH): %s", exc)
        raise SystemExit(1) from None
    log.info("model package %s %s verified (package %s)", pkg.name, pkg.version, pkg.package_sha256[:12])


@worker_process_init.connect
def _start_process(**_: Any) -> None:
    """Build this pool process's runtime and load the network, so the first cine does not pay for it."""
    runtime = LusaiTask.use(WorkerRuntime.from_settings(Settings()))
    if not consumes_analyze(app):
        return
    try:
        runtime.analyzer  # noqa: B018  (loads the network)
    except Exception:  # the task will try again and fail the job with the reason
        log.exception("model could not be loaded at worker start")


@worker_process_shutdown.connect
def _stop_process(**_: Any) -> None:
    LusaiTask.release()
