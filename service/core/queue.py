"""The queue: sends tasks by name, so the SCP and API never import torch or ``workers/``.

Embedded mode uses kombu's filesystem transport under ``LUSAI_DATA_DIR/broker`` (a real Celery
worker consumes a real queue, no server needed); production uses Redis. The database, not the
broker, is the source of truth: every job has a row first, and :mod:`service.core.recovery` re-sends
jobs whose message was lost (a killed worker, a broker restart), which is why tasks are idempotent.

Analysis jobs go to one shared queue, ``analyze``, or by device (``LUSAI_ANALYZE_ROUTING``):
``analyze.gpu`` while a GPU worker is alive in the registry (:mod:`service.core.registry`), else
``analyze.cpu``. A worker that consumes ``analyze`` also consumes the queue of its own device
(``workers/celery_app.py``), so every mode has a consumer whatever the mix of hosts.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from celery import Celery

from service.core.settings import Settings

if TYPE_CHECKING:
    from service.core.db import Database

log = logging.getLogger(__name__)

ANALYZE_TASK = "lusai.analyze"
DELIVER_TASK = "lusai.deliver"
PREVIEWS_TASK = "lusai.previews"
ANALYZE_QUEUE = "analyze"
ANALYZE_GPU_QUEUE = "analyze.gpu"
ANALYZE_CPU_QUEUE = "analyze.cpu"
#: Every queue of analysis jobs: a worker consuming one of them loads the model.
ANALYZE_QUEUES = (ANALYZE_QUEUE, ANALYZE_GPU_QUEUE, ANALYZE_CPU_QUEUE)
DELIVER_QUEUE = "deliver"
#: Every queue lusai sends to (``/metrics`` shows the depth of each).
QUEUES = (*ANALYZE_QUEUES, DELIVER_QUEUE)
#: Seconds the producer keeps its ``prefer-gpu`` decision (one registry read per this at most).
ROUTING_CACHE_S = 5.0


def device_queue(device: str) -> str:
    """The analysis queue of a worker on ``device`` (cpu, cuda)."""
    return ANALYZE_GPU_QUEUE if device == "cuda" else ANALYZE_CPU_QUEUE


def worker_queues(queues: list[str], device: str) -> list[str]:
    """The queues a worker consumes: those asked for, plus its device's analysis queue when it
    consumes the shared ``analyze`` and names neither device queue itself."""
    if ANALYZE_QUEUE in queues and not {ANALYZE_GPU_QUEUE, ANALYZE_CPU_QUEUE} & set(queues):
        return [*queues, device_queue(device)]
    return list(queues)


def celery_config(settings: Settings) -> dict[str, Any]:
    """Task defaults shared by producers and workers (Celery's task guide: acks_late, prefetch 1)."""
    conf: dict[str, Any] = {
        "broker_url": settings.broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": 5,
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_proc_alive_timeout": 120,  # pool processes load the model at start (see celery_app)
        "task_time_limit": settings.task_time_limit,
        "task_soft_time_limit": max(settings.task_time_limit - 30, 5),
        "task_default_queue": ANALYZE_QUEUE,
        # Previews go behind the deliveries of the same result: PACS never waits for them.
        "task_routes": {
            ANALYZE_TASK: {"queue": ANALYZE_QUEUE},
            DELIVER_TASK: {"queue": DELIVER_QUEUE},
            PREVIEWS_TASK: {"queue": DELIVER_QUEUE},
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "broker_transport_options": {},
    }
    if settings.embedded_broker:
        d = settings.broker_dir
        for sub in ("queue", "control", "processed"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        conf["broker_transport_options"] = {
            "data_folder_in": str(d / "queue"),
            "data_folder_out": str(d / "queue"),
            "control_folder": str(d / "control"),
            "processed_folder": str(d / "processed"),
            "store_processed": False,
            "polling_interval": 0.2,  # a directory listing is cheap; 1 s default adds latency per hop
        }
        conf["worker_enable_remote_control"] = False
    else:
        # Redis: a message not acked within the visibility timeout is redelivered (killed worker).
        conf["broker_transport_options"] = {"visibility_timeout": settings.task_time_limit + 300}
    return conf


class TaskQueue:
    """The producer side of the queue: sends tasks by name on the configured broker.

    The Celery producer (and, in embedded mode, the broker folders) is made on the first send, so a
    command that never sends creates nothing; it is shared by the process's threads (the SCP's
    associations, the API's handlers), as Celery's producer pool is. ``db`` holds the worker
    registry that ``LUSAI_ANALYZE_ROUTING=prefer-gpu`` reads (without it: ``analyze.cpu``).
    """

    def __init__(self, settings: Settings, db: Database | None = None) -> None:
        self._settings = settings
        self._db = db
        self._app: Celery | None = None
        self._lock = threading.Lock()
        self._route: tuple[float, str] | None = None  # (monotonic time, queue) of the last decision

    @property
    def producer(self) -> Celery:
        with self._lock:
            if self._app is None:
                app = Celery("lusai-producer")
                app.conf.update(celery_config(self._settings))
                self._app = app
            return self._app

    def enqueue_analysis(self, job_id: int, countdown: float = 0) -> None:
        """Send an analysis job (a retry after ``countdown`` seconds) to :meth:`analyze_queue`."""
        self.producer.send_task(
            ANALYZE_TASK, args=[job_id], queue=self.analyze_queue(), countdown=countdown or None
        )

    def analyze_queue(self, *, fresh: bool = False) -> str:
        """Where an analysis job goes now (``LUSAI_ANALYZE_ROUTING``): ``analyze`` (any),
        ``analyze.gpu`` (gpu-only; prefer-gpu while a live CUDA worker consumes it, decided from
        the registry at most every :data:`ROUTING_CACHE_S`), else ``analyze.cpu``. A registry that
        cannot be read keeps the last decision, or sends to the shared ``analyze``, which every
        analysing worker consumes. ``fresh``: read the registry now, whatever the cache holds."""
        routing = self._settings.analyze_routing
        if routing == "any":
            return ANALYZE_QUEUE
        if routing == "gpu-only":
            return ANALYZE_GPU_QUEUE
        now = time.monotonic()
        last = self._route
        if last is not None and now - last[0] < ROUTING_CACHE_S and not fresh:
            return last[1]
        try:
            queue = ANALYZE_GPU_QUEUE if self._gpu_worker_alive() else ANALYZE_CPU_QUEUE
        except Exception as exc:
            log.warning(
                "worker registry not readable: routing unchanged",
                extra={"ctx": {"error": type(exc).__name__}},
            )
            return last[1] if last is not None else ANALYZE_QUEUE
        self._route = (now, queue)
        return queue

    def _gpu_worker_alive(self) -> bool:
        if self._db is None:
            return False
        from service.core.registry import gpu_worker_alive

        with self._db.session() as session:
            return gpu_worker_alive(session, lost_after=self._settings.lost_after, queue=ANALYZE_GPU_QUEUE)

    def enqueue_delivery(self, delivery_id: int, countdown: float = 0) -> None:
        self.producer.send_task(
            DELIVER_TASK, args=[delivery_id], queue=DELIVER_QUEUE, countdown=countdown or None
        )

    def broker_started(self) -> tuple[str, float] | None:
        """The broker's identity and age: (Redis ``run_id``, seconds up); None for the embedded
        queue, whose messages are files that outlive any restart.

        A new ``run_id`` means Redis restarted, and one run without persistence (as lusai's
        deployment docs and ``.ci/run`` start it) lost every message it held.
        """
        url = self._settings.broker_url
        if self._settings.embedded_broker or not url or not url.startswith(("redis://", "rediss://")):
            return None
        import redis

        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        try:
            info = client.info("server")
        finally:
            client.close()
        return str(info["run_id"]), float(info["uptime_in_seconds"])

    def depths(self) -> dict[str, int]:
        """Messages waiting in each of :data:`QUEUES` (a retry's countdown and a message a worker
        holds are not waiting): Redis ``LLEN`` of the queue's lists (kombu keeps one per priority
        step), or the embedded broker's message files of the queue."""
        if self._settings.embedded_broker:
            folder = self._settings.broker_dir / "queue"
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            # kombu's filesystem transport names a message file <time>_<uuid>.<queue>.msg
            found = [n.partition(".")[2] for n in names]
            return {q: found.count(f"{q}.msg") for q in QUEUES}
        url = self._settings.broker_url or ""
        if not url.startswith(("redis://", "rediss://")):
            return {}
        import redis

        client = redis.Redis.from_url(url, socket_timeout=3, socket_connect_timeout=3)
        try:
            pipe = client.pipeline(transaction=False)
            for q in QUEUES:
                for key in _redis_keys(q):
                    pipe.llen(key)
            counts = iter(pipe.execute())
            return {q: sum(next(counts) for _ in _redis_keys(q)) for q in QUEUES}
        finally:
            client.close()

    def enqueue_previews(self, result_id: int) -> None:
        """Render a result's previews for the REST API, behind its deliveries (same queue)."""
        self.producer.send_task(PREVIEWS_TASK, args=[result_id], queue=DELIVER_QUEUE)

    def ping(self, timeout: float = 3.0) -> None:
        """Raise if the broker cannot be reached (``/health``, ``lusai check``)."""
        with self.producer.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)

    def close(self) -> None:
        """Release the producer's broker connections (a later send opens new ones)."""
        with self._lock:
            app, self._app = self._app, None
        if app is not None:
            app.close()


def _redis_keys(queue: str) -> list[str]:
    """The Redis lists of one queue: kombu's transport adds one per priority step (``sep`` + step)."""
    return [queue, *(f"{queue}\x06\x16{step}" for step in (3, 6, 9))]
