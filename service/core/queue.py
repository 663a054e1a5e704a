"""The queue: sends tasks by name, so the SCP and API never import torch or ``workers/``.

Embedded mode uses kombu's filesystem transport under ``LUSAI_DATA_DIR/broker`` (a real Celery
worker consumes a real queue, no server needed); production uses Redis. The database, not the
broker, is the source of truth: every job has a row first, and :mod:`service.core.recovery` re-sends
jobs whose message was lost (a killed worker, a broker restart), which is why tasks are idempotent.
"""

from __future__ import annotations

import threading
from typing import Any

from celery import Celery

from service.core.settings import Settings

ANALYZE_TASK = "lusai.analyze"
DELIVER_TASK = "lusai.deliver"
PREVIEWS_TASK = "lusai.previews"
ANALYZE_QUEUE = "analyze"
DELIVER_QUEUE = "deliver"


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
    associations, the API's handlers), as Celery's producer pool is.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app: Celery | None = None
        self._lock = threading.Lock()

    @property
    def producer(self) -> Celery:
        with self._lock:
            if self._app is None:
                app = Celery("lusai-producer")
                app.conf.update(celery_config(self._settings))
                self._app = app
            return self._app

    def enqueue_analysis(self, job_id: int) -> None:
        self.producer.send_task(ANALYZE_TASK, args=[job_id], queue=ANALYZE_QUEUE)

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
