"""The recovery sweep on a throw-away database and store: lost jobs and deliveries are sent again,
abandoned temporary files removed, and a failing step costs one sweep, not the process."""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from service.core import recovery
from service.core.models import (
    DeliveryState,
    Job,
    JobState,
)
from service.core.queue import ANALYZE_TASK, DELIVER_TASK, TaskQueue
from service.core.runtime import Runtime
from tests.conftest import broker_messages, free_port, which
from tests.rows import add_delivery, add_instance, add_job

_uids = itertools.count(1)


def _ago(**delta: float) -> datetime:
    """A time ``delta`` before now (read per test: the suite may run long after this is imported)."""
    return datetime.now(UTC) - timedelta(**delta)


class DownQueue(TaskQueue):
    """A producer whose broker cannot be reached."""

    def enqueue_analysis(self, job_id: int) -> None:
        raise ConnectionRefusedError("broker down")


def _instance(runtime: Runtime) -> int:
    with runtime.db.session() as s:
        return add_instance(s)


def _job(runtime: Runtime, instance_id: int, state: JobState, **values: Any) -> int:
    """A job row written directly in ``state``: the situation the sweep finds."""
    with runtime.db.session() as s:
        return add_job(s, instance_id, state, **values)


def _jobs(runtime: Runtime) -> dict[int, Job]:
    with runtime.db.session() as s:
        jobs = {j.id: j for j in s.scalars(select(Job))}
        s.expunge_all()
        return jobs


def test_jobs_never_sent_or_whose_worker_was_lost_go_back_on_the_queue(runtime: Runtime) -> None:
    long_ago, now = _ago(hours=2), _ago()
    inst = _instance(runtime)
    max_attempts = runtime.settings.job_max_attempts
    unsent = _job(runtime, inst, JobState.QUEUED, enqueued_at=None)
    sent = _job(runtime, inst, JobState.QUEUED, enqueued_at=now)
    message_lost = _job(runtime, inst, JobState.RETRYING, enqueued_at=long_ago)
    worker_lost = _job(runtime, inst, JobState.RUNNING, started_at=long_ago, enqueued_at=long_ago)
    last_try = _job(runtime, inst, JobState.RUNNING, started_at=long_ago, attempts=max_attempts)
    running = _job(runtime, inst, JobState.RUNNING, started_at=now, enqueued_at=now)
    done = _job(runtime, inst, JobState.SUCCEEDED, enqueued_at=long_ago, started_at=long_ago)

    assert recovery.requeue_stale_jobs(runtime) == 3

    resent = sorted([unsent, message_lost, worker_lost])
    assert sorted(m.args[0] for m in broker_messages(runtime.settings) if m.task == ANALYZE_TASK) == resent
    jobs = _jobs(runtime)
    for job_id in resent:
        assert jobs[job_id].enqueued_at is not None  # stamped again once the broker had it
    assert jobs[worker_lost].state == JobState.QUEUED and jobs[message_lost].state == JobState.RETRYING
    assert jobs[last_try].state == JobState.FAILED
    assert jobs[last_try].error == "worker lost on the last attempt"
    assert [jobs[j].state for j in (sent, running, done)] == [
        JobState.QUEUED,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert recovery.requeue_stale_jobs(runtime) == 0  # nothing is lost any more


def test_jobs_of_a_killed_worker_go_back_on_the_queue_at_once(runtime: Runtime) -> None:
    """A stopping worker killed after its shutdown grace: the jobs its processes held are queued
    again right away, not 30 minutes later by the stale-job rule (issue 12, shutdown campaign)."""
    host, now = socket.gethostname(), _ago()
    inst = _instance(runtime)
    max_attempts = runtime.settings.job_max_attempts
    killed = _job(runtime, inst, JobState.RUNNING, started_at=now, worker=f"{host}:4242")
    killed_last = _job(
        runtime, inst, JobState.RUNNING, started_at=now, worker=f"{host}:4243", attempts=max_attempts
    )
    other = _job(runtime, inst, JobState.RUNNING, started_at=now, worker=f"{host}:999")
    elsewhere = _job(runtime, inst, JobState.RUNNING, started_at=now, worker="otherhost:4242")
    done = _job(runtime, inst, JobState.SUCCEEDED, worker=f"{host}:4242")

    assert recovery.requeue_jobs_of(runtime, {4242, 4243}) == 1

    assert [m.args[0] for m in broker_messages(runtime.settings) if m.task == ANALYZE_TASK] == [killed]
    jobs = _jobs(runtime)
    assert jobs[killed].state == JobState.QUEUED and jobs[killed].enqueued_at is not None
    assert jobs[killed_last].state == JobState.FAILED
    assert [jobs[j].state for j in (other, elsewhere, done)] == [
        JobState.RUNNING,
        JobState.RUNNING,
        JobState.SUCCEEDED,
    ]
    assert recovery.requeue_jobs_of(runtime, {4242}) == 0
    assert recovery.requeue_jobs_of(runtime, set()) == 0


def test_a_broker_still_down_leaves_the_job_for_the_next_sweep(runtime: Runtime) -> None:
    job_id = _job(runtime, _instance(runtime), JobState.QUEUED, enqueued_at=None)
    down = replace(runtime, queue=DownQueue(runtime.settings))
    recovery.requeue_stale_jobs(down)
    assert _jobs(runtime)[job_id].enqueued_at is None and broker_messages(runtime.settings) == []
    assert recovery.requeue_stale_jobs(runtime) == 1  # the broker is back
    assert [m.args for m in broker_messages(runtime.settings)] == [[job_id]]


def _delivery(runtime: Runtime, state: DeliveryState, created_at: datetime, **values: Any) -> int:
    with runtime.db.session() as s:
        return add_delivery(s, state, f"9.9.{next(_uids)}", created_at=created_at, **values)


def test_deliveries_whose_message_was_lost_are_sent_again(runtime: Runtime) -> None:
    long_ago, now, soon = _ago(hours=2), _ago(), _ago(minutes=-1)
    lost = [
        _delivery(runtime, DeliveryState.PENDING, long_ago),
        _delivery(runtime, DeliveryState.RETRYING, long_ago, next_attempt_at=long_ago),
        _delivery(runtime, DeliveryState.SENDING, long_ago),  # its worker died mid-send
    ]
    _delivery(runtime, DeliveryState.PENDING, now)
    _delivery(runtime, DeliveryState.RETRYING, long_ago, next_attempt_at=soon)
    _delivery(runtime, DeliveryState.SENDING, now)
    _delivery(runtime, DeliveryState.DELIVERED, long_ago)
    _delivery(runtime, DeliveryState.DEAD, long_ago)

    assert recovery.requeue_lost_deliveries(runtime) == 3
    sent = broker_messages(runtime.settings)
    assert {m.task for m in sent} == {DELIVER_TASK}
    assert sorted(m.args[0] for m in sent) == sorted(lost)
    assert all(m.eta is None for m in sent)  # due already: sent at once


def test_abandoned_temporary_files_are_removed(runtime: Runtime) -> None:
    tmp = runtime.store.tmp_dir
    now = 1_000_000.0
    old, fresh = tmp / "abandoned.part", tmp / "receiving.part"
    folder = tmp / "a-folder"
    folder.mkdir()
    for path in (old, fresh):
        path.write_bytes(b"x")
    for path in (old, folder):
        os.utime(path, (now - 7200, now - 7200))
    os.utime(fresh, (now - 60, now - 60))

    assert recovery.remove_stale_temp_files(runtime, now=now) == 1
    assert not old.exists() and fresh.exists() and folder.is_dir()


def test_a_slow_network_keeps_temporary_files_longer(runtime: Runtime) -> None:
    """A receive can be silent for a network timeout: twice that must pass before its file goes."""
    slow = replace(runtime, settings=runtime.settings.model_copy(update={"network_timeout": 4000.0}))
    path = slow.store.tmp_dir / "slow.part"
    path.write_bytes(b"x")
    now = path.stat().st_mtime + 7200
    assert recovery.remove_stale_temp_files(slow, now=now) == 0
    assert recovery.remove_stale_temp_files(slow, now=now + 1000) == 1


def test_the_core_steps_in_order(runtime: Runtime) -> None:
    watch, lost_workers, gpu_gone, *steps = recovery.steps(runtime)
    assert isinstance(watch, recovery.BrokerRestarts) and watch.runtime is runtime
    assert isinstance(lost_workers, recovery.LostWorkers) and lost_workers.runtime is runtime
    assert isinstance(gpu_gone, recovery.GpuWorkersGone) and gpu_gone.runtime is runtime
    assert [s.func for s in steps] == [  # type: ignore[attr-defined]
        recovery.requeue_stale_jobs,
        recovery.requeue_lost_deliveries,
        recovery.remove_stale_temp_files,
        recovery.forget_workers,
    ]
    assert all(s.args == (runtime,) for s in steps)  # type: ignore[attr-defined]
    steps = [watch, lost_workers, gpu_gone, *steps]
    recovery.sweep(steps)  # an empty deployment: nothing to do, nothing raised


def test_a_failing_step_ends_the_sweep_and_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    ran: list[str] = []

    def broken() -> None:
        ran.append("broken")
        raise ConnectionError("database down")

    caplog.set_level(logging.WARNING, logger=recovery.__name__)
    recovery.sweep([lambda: ran.append("first"), broken, lambda: ran.append("after")])
    assert ran == ["first", "broken"]  # the next sweep tries again from the start
    [record] = caplog.records
    assert record.getMessage() == "recovery sweep failed; will retry"
    assert record.ctx == {"error": "ConnectionError"}  # type: ignore[attr-defined]


def test_background_sweeps_repeat_until_stopped() -> None:
    count = 0
    twice = threading.Event()

    def step() -> None:
        nonlocal count
        count += 1
        if count >= 2:
            twice.set()

    before = set(threading.enumerate())
    stop = recovery.start_background([step], interval=0.01)
    [thread] = [t for t in threading.enumerate() if t not in before]
    assert thread.name == "lusai-recovery" and thread.daemon  # never holds up the process's exit
    assert twice.wait(5)
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


@contextlib.contextmanager
def _own_redis(port: int) -> Iterator[None]:
    """A redis-server of this test's own on ``port``, keeping nothing on disk (as deployed)."""
    proc = subprocess.Popen(
        [
            which("redis-server"),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        client.close()
        yield
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.redis
def test_a_broker_restart_sends_the_messages_it_lost_at_the_next_sweep(runtime: Runtime) -> None:
    """Regression (bench/chaos/faults.py redis_restart): the jobs whose message Redis lost in a
    restart waited for requeue_stale's max(60 s, LUSAI_TASK_TIME_LIMIT), 15 min by default."""
    import redis

    port = free_port()
    settings = runtime.settings.model_copy(update={"broker_url": f"redis://127.0.0.1:{port}/0"})
    rt = replace(runtime, settings=settings, queue=TaskQueue(settings))
    watch = recovery.BrokerRestarts(rt)
    instance_id = _instance(rt)
    with _own_redis(port):
        assert watch() == 0  # the first look only learns who the broker is
        lost_job = _job(rt, instance_id, JobState.QUEUED, enqueued_at=_ago(seconds=30))
        just_before = _job(rt, instance_id, JobState.QUEUED, enqueued_at=_ago(seconds=1))
        unsent = _job(rt, instance_id, JobState.QUEUED)
        retrying = _job(rt, instance_id, JobState.RETRYING, attempts=1, enqueued_at=_ago(seconds=30))
        with rt.db.session() as s:
            lost_delivery = add_delivery(s, DeliveryState.PENDING, created_at=_ago(seconds=30))
        rt.queue.close()
    with _own_redis(port):  # restarted: empty
        assert watch() == 0 + 4  # the jobs sent before (even just before), the one never sent, the delivery
        assert watch() == 0  # once
        with rt.db.session() as s:
            fresh = add_job(s, instance_id, JobState.QUEUED, enqueued_at=datetime.now(UTC))
        client = redis.Redis(port=port)
        bodies = [
            json.loads(base64.b64decode(json.loads(m)["body"]))[0]
            for queue in ("analyze", "deliver")
            for m in client.lrange(queue, 0, -1)
        ]
        client.close()
        rt.queue.close()
    assert sorted(bodies) == sorted([[lost_job], [just_before], [unsent], [lost_delivery]])
    assert retrying not in {b[0] for b in bodies} and fresh not in {b[0] for b in bodies}
    assert _jobs(rt)[lost_job].enqueued_at is not None  # stamped again when sent


def test_the_embedded_queue_has_no_restart_to_notice(runtime: Runtime) -> None:
    assert runtime.queue.broker_started() is None
    assert recovery.BrokerRestarts(runtime)() == 0


def _lost_worker(runtime: Runtime, name: str, device: str = "cpu", seconds: float = 0.0) -> None:
    """A registered worker whose last heartbeat is ``seconds`` old."""
    from sqlalchemy import update

    from service.core import lifecycle, registry
    from service.core.models import Worker

    queues = ("analyze", "analyze.gpu" if device == "cuda" else "analyze.cpu")
    with runtime.db.session() as s:
        registry.register(s, registry.Identity(name, "h", 1, queues, device, None, 1, "0"))
        old = lifecycle.db_now(s) - timedelta(seconds=seconds)
        s.execute(update(Worker).where(Worker.name == name).values(last_seen=old, started_at=old))


def test_jobs_of_a_lost_worker_go_back_on_the_queue_at_the_next_sweep(runtime: Runtime) -> None:
    """No heartbeat for LUSAI_WORKER_LOST_AFTER (a host off, a link cut): its running job is sent
    again now, not after LUSAI_STALE_JOB_AFTER (30 min)."""
    lost_after = runtime.settings.lost_after
    _lost_worker(runtime, "lost@h", seconds=lost_after + 5)
    _lost_worker(runtime, "alive@h", seconds=1)
    inst, now = _instance(runtime), _ago()
    lost = _job(runtime, inst, JobState.RUNNING, started_at=now, worker="h:1", worker_name="lost@h")
    alive = _job(runtime, inst, JobState.RUNNING, started_at=now, worker="h:2", worker_name="alive@h")
    assert recovery.requeue_jobs_of_lost_workers(runtime) == 1
    assert [m.args[0] for m in broker_messages(runtime.settings) if m.task == ANALYZE_TASK] == [lost]
    jobs = _jobs(runtime)
    assert jobs[lost].state == JobState.QUEUED and jobs[lost].enqueued_at is not None
    assert jobs[alive].state == JobState.RUNNING
    assert recovery.requeue_jobs_of_lost_workers(runtime) == 0


def test_queued_jobs_of_gpu_workers_that_are_gone_go_to_the_cpu_workers(runtime: Runtime) -> None:
    """prefer-gpu: jobs sent to analyze.gpu while a GPU worker was alive are sent again to
    analyze.cpu once the last one is lost, not after max(60 s, LUSAI_TASK_TIME_LIMIT)."""
    from service.core import lifecycle

    settings = runtime.settings.model_copy(update={"analyze_routing": "prefer-gpu"})
    with Runtime.from_settings(settings) as rt:
        _lost_worker(rt, "gpu@h", device="cuda", seconds=1)
        inst = _instance(rt)
        step = recovery.GpuWorkersGone(rt)
        assert step() == 0  # first look: a GPU worker alive
        job = _job(rt, inst, JobState.QUEUED)
        with rt.db.session() as s:
            assert lifecycle.enqueue(s, job, rt.queue.enqueue_analysis)
        assert rt.queue.depths()["analyze.gpu"] == 1
        assert step() == 0
        _lost_worker(rt, "gpu@h", device="cuda", seconds=rt.settings.lost_after + 5)
        assert step() == 1
        assert (rt.queue.depths()["analyze.gpu"], rt.queue.depths()["analyze.cpu"]) == (1, 1)
        assert step() == 0  # once per change
    plain = recovery.GpuWorkersGone(runtime)  # LUSAI_ANALYZE_ROUTING=any: nothing to watch
    assert plain() == 0 and plain.queue is None


def test_no_worker_is_declared_lost_right_after_the_database_comes_back(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a database outage every heartbeat is old, live workers' too: this process waits a
    heartbeat interval of good sweeps before it takes a running job from its worker."""
    interval = runtime.settings.heartbeat_interval
    _lost_worker(runtime, "w@h", seconds=runtime.settings.lost_after + 5)
    job = _job(
        runtime, _instance(runtime), JobState.RUNNING, started_at=_ago(), worker="h:1", worker_name="w@h"
    )
    clock = [1000.0]
    monkeypatch.setattr(recovery.time, "monotonic", lambda: clock[0])
    step = recovery.LostWorkers(runtime)
    assert step() == 0  # this process's first sweep
    clock[0] += interval
    assert step() == 0 and _jobs(runtime)[job].state == JobState.RUNNING
    clock[0] += recovery.HEARTBEAT_SLACK_S
    assert step() == 1 and _jobs(runtime)[job].state == JobState.QUEUED
    # a gap (the sweeps failed meanwhile: the database was away) starts the wait again
    with runtime.db.session() as s:
        assert lifecycle_claim(s, job)
    clock[0] += runtime.settings.recovery_interval + interval + 1
    assert step() == 0 and _jobs(runtime)[job].state == JobState.RUNNING
    clock[0] += interval + recovery.HEARTBEAT_SLACK_S
    assert step() == 1


def lifecycle_claim(session: Any, job_id: int) -> bool:
    from service.core import lifecycle

    return lifecycle.claim(session, job_id, "h:2", worker_name="w@h")
