"""The queue: Celery's configuration for the embedded and the Redis broker, and what a send puts on
the wire (read back through a real kombu channel on Celery's in-memory transport)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from kombu import Message

from service.core.queue import (
    ANALYZE_QUEUE,
    ANALYZE_TASK,
    DELIVER_QUEUE,
    DELIVER_TASK,
    PREVIEWS_TASK,
    TaskQueue,
    celery_config,
)
from service.core.settings import Settings


def test_both_brokers_route_each_task_to_its_queue_and_ack_late(tmp_path: Path) -> None:
    """A worker killed mid-task leaves its message to be redelivered, on either broker."""
    for broker_url in (None, "redis://127.0.0.1:6379/0"):
        conf = celery_config(Settings(data_dir=tmp_path, broker_url=broker_url))
        assert conf["task_routes"] == {
            ANALYZE_TASK: {"queue": ANALYZE_QUEUE},
            DELIVER_TASK: {"queue": DELIVER_QUEUE},
            PREVIEWS_TASK: {"queue": DELIVER_QUEUE},  # behind the deliveries, off the analysis queue
        }
        assert conf["task_default_queue"] == ANALYZE_QUEUE
        assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"]
        assert conf["worker_prefetch_multiplier"] == 1  # one cine at a time per process
        assert conf["task_ignore_result"]  # the database holds the outcome, not a result backend
        assert (conf["task_serializer"], conf["accept_content"]) == ("json", ["json"])


def test_time_limits_follow_the_settings(tmp_path: Path) -> None:
    conf = celery_config(Settings(data_dir=tmp_path, task_time_limit=600))
    assert (conf["task_time_limit"], conf["task_soft_time_limit"]) == (600, 570)
    short = celery_config(Settings(data_dir=tmp_path, task_time_limit=20))
    assert short["task_soft_time_limit"] == 5  # never zero or negative


def test_embedded_broker_is_a_folder_queue(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert settings.embedded_broker
    conf = celery_config(settings)
    opts = conf["broker_transport_options"]
    queue = settings.broker_dir / "queue"
    assert opts["data_folder_in"] == opts["data_folder_out"] == str(queue)
    assert opts["control_folder"] == str(settings.broker_dir / "control")
    assert not opts["store_processed"]
    for sub in ("queue", "control", "processed"):
        assert (settings.broker_dir / sub).is_dir()  # kombu's filesystem transport needs them
    assert conf["worker_enable_remote_control"] is False  # no broadcast exchange on folders
    assert "visibility_timeout" not in opts


def test_redis_redelivers_after_the_time_limit_and_makes_no_folders(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:6379/0", task_time_limit=600)
    assert not settings.embedded_broker
    conf = celery_config(settings)
    assert conf["broker_url"] == "redis://127.0.0.1:6379/0"
    # Longer than a job may run, so a slow job is never handed to a second worker while it runs.
    assert conf["broker_transport_options"] == {"visibility_timeout": 900}
    assert "worker_enable_remote_control" not in conf
    assert not settings.broker_dir.exists()


@pytest.fixture
def memory_queue(tmp_path: Path) -> Iterator[TaskQueue]:
    """A producer on kombu's in-memory transport (process-wide queues: emptied before and after)."""
    queue = TaskQueue(Settings(data_dir=tmp_path, broker_url="memory://"))
    _drain(queue)
    yield queue
    _drain(queue)
    queue.close()


def _received(queue: TaskQueue, name: str) -> list[Message]:
    """The messages waiting on queue ``name``, taken off it."""
    out: list[Message] = []
    with queue.producer.connection_for_read() as conn, conn.SimpleQueue(name) as consumer:
        while True:
            try:
                message = consumer.get(timeout=0.05)
            except consumer.Empty:
                return out
            message.ack()
            out.append(message)


def _drain(queue: TaskQueue) -> None:
    for name in (ANALYZE_QUEUE, DELIVER_QUEUE):
        _received(queue, name)


def test_enqueue_analysis_sends_the_job_id_to_the_analyze_queue(memory_queue: TaskQueue) -> None:
    memory_queue.enqueue_analysis(41)
    memory_queue.enqueue_analysis(42)
    sent = _received(memory_queue, ANALYZE_QUEUE)
    assert [(m.headers["task"], m.payload[0]) for m in sent] == [(ANALYZE_TASK, [41]), (ANALYZE_TASK, [42])]
    assert {m.delivery_info["routing_key"] for m in sent} == {ANALYZE_QUEUE}
    assert all(m.headers["eta"] is None for m in sent)  # to be run now
    assert _received(memory_queue, DELIVER_QUEUE) == []


def test_enqueue_delivery_sends_to_the_deliver_queue_with_its_countdown(memory_queue: TaskQueue) -> None:
    before = datetime.now().astimezone()
    memory_queue.enqueue_delivery(7)
    memory_queue.enqueue_delivery(8, countdown=30)
    now, later = _received(memory_queue, DELIVER_QUEUE)
    assert [(m.headers["task"], m.payload[0]) for m in (now, later)] == [
        (DELIVER_TASK, [7]),
        (DELIVER_TASK, [8]),
    ]
    assert now.headers["eta"] is None  # countdown 0: no eta, the worker sends at once
    eta = datetime.fromisoformat(later.headers["eta"])
    assert before + timedelta(seconds=29) <= eta <= datetime.now().astimezone() + timedelta(seconds=31)
    assert _received(memory_queue, ANALYZE_QUEUE) == []
