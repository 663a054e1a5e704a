"""The worker registry: registration, heartbeats, lost and stopped workers, the jobs each holds, the
producer's routing by device and the queue depths ``/metrics`` reads."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, update

from service.core import lifecycle, registry
from service.core.db import Database
from service.core.models import Base, Job, JobState, Worker
from service.core.queue import (
    ANALYZE_CPU_QUEUE,
    ANALYZE_GPU_QUEUE,
    ANALYZE_QUEUE,
    DELIVER_QUEUE,
    QUEUES,
    TaskQueue,
    worker_queues,
)
from service.core.settings import Settings
from tests.rows import add_instance, add_job


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """An empty schema on SQLite and on PostgreSQL (whose clock the registry stamps with)."""
    url = (
        f"sqlite:///{tmp_path / 'r.sqlite'}"
        if request.param == "sqlite"
        else request.getfixturevalue("pg_url")
    )
    database = Database(url)
    Base.metadata.create_all(database.engine)
    yield database
    database.dispose()


def me(
    name: str = "lusai-1-analyze@host-a", device: str = "cpu", queues: tuple[str, ...] = ()
) -> registry.Identity:
    return registry.Identity(
        name=name,
        host=name.rpartition("@")[2],
        pid=123,
        queues=queues or ("analyze", f"analyze.{'gpu' if device == 'cuda' else 'cpu'}"),
        device=device,
        gpu_name="NVIDIA H200" if device == "cuda" else None,
        concurrency=2,
        version="0.1.0",
    )


def _age(db: Database, name: str, seconds: float) -> None:
    """Make the worker's last heartbeat ``seconds`` old (as if it had stopped beating)."""
    with db.session() as s:
        now = lifecycle.db_now(s)
        s.execute(
            update(Worker).where(Worker.name == name).values(last_seen=now - timedelta(seconds=seconds))
        )


def test_register_beat_count_and_stop(db: Database) -> None:
    a = me()
    with db.session() as s:
        registry.register(s, a)
        assert registry.beat(s, a.name) and not registry.beat(s, "unknown@x")
        registry.count_job(s, a.name, failed=False)
        registry.count_job(s, a.name, failed=False)
        registry.count_job(s, a.name, failed=True)
    with db.session() as s:
        [w] = registry.workers(s, lost_after=45)
    assert (w.name, w.host, w.pid, w.queues, w.device, w.gpu_name, w.concurrency, w.version) == (
        a.name,
        "host-a",
        123,
        ("analyze", "analyze.cpu"),
        "cpu",
        None,
        2,
        "0.1.0",
    )
    assert w.alive and 0 <= w.last_seen_s < 5 and (w.jobs_done, w.jobs_failed) == (2, 1) and w.jobs == ()
    with db.session() as s:
        assert registry.stopped(s, a.name)
        assert not registry.beat(s, a.name)  # a stopped worker's row is not revived by a stray beat
        assert registry.workers(s, lost_after=45) == []  # stopped: not shown
        # started again under the same name: a fresh row, counters from zero
        registry.register(s, a)
        [w] = registry.workers(s, lost_after=45)
    assert w.alive and (w.jobs_done, w.jobs_failed) == (0, 0)


def test_a_worker_without_heartbeat_is_lost_and_its_jobs_are_in_flight(db: Database) -> None:
    a, b = me("a@host-a"), me("b@host-b")
    with db.session() as s:
        registry.register(s, a)
        registry.register(s, b)
        instance = add_instance(s)
        running = add_job(s, instance, JobState.RUNNING, worker_name=b.name, started_at=lifecycle.db_now(s))
        add_job(s, instance, JobState.SUCCEEDED, worker_name=b.name)
    _age(db, b.name, 46)
    with db.session() as s:
        found = {w.name: w for w in registry.workers(s, lost_after=45)}
    assert found[a.name].alive and not found[b.name].alive and found[b.name].last_seen_s >= 46
    assert [j.job_id for j in found[b.name].jobs] == [running] and found[a.name].jobs == ()
    assert found[b.name].jobs[0].since is not None


def test_a_registration_made_late_is_dated_back(db: Database) -> None:
    """The heartbeat registers again after the database was away: its start is dated back by the
    time it has been up, so jobs it claimed meanwhile are not taken for an earlier run's."""
    with db.session() as s:
        started = registry.register(s, me(), up_for=600)
        assert lifecycle.db_now(s) - started >= timedelta(seconds=599)


def test_a_live_gpu_worker_on_its_queue(db: Database) -> None:
    gpu = me("g@gpu-host", device="cuda")
    with db.session() as s:
        assert not registry.gpu_worker_alive(s, lost_after=45, queue=ANALYZE_GPU_QUEUE)
        registry.register(s, me("c@cpu-host"))
        assert not registry.gpu_worker_alive(s, lost_after=45, queue=ANALYZE_GPU_QUEUE)
        registry.register(s, gpu)
        assert registry.gpu_worker_alive(s, lost_after=45, queue=ANALYZE_GPU_QUEUE)
        # a CUDA worker that does not consume analyze.gpu (its queues named by hand) does not count
        registry.register(s, me("g2@gpu-host", device="cuda", queues=("deliver",)))
    _age(db, gpu.name, 60)
    with db.session() as s:
        assert not registry.gpu_worker_alive(s, lost_after=45, queue=ANALYZE_GPU_QUEUE)


def test_old_rows_are_forgotten_and_the_oldest_queued_job_is_aged(db: Database) -> None:
    with db.session() as s:
        registry.register(s, me("old@a"))
        registry.register(s, me("new@a"))
        assert registry.oldest_queued_age(s) == 0.0
        instance = add_instance(s)
        now = lifecycle.db_now(s)
        add_job(s, instance, JobState.QUEUED, created_at=now - timedelta(seconds=90))
        add_job(s, instance, JobState.QUEUED, created_at=now - timedelta(seconds=30))
        add_job(s, instance, JobState.RUNNING, created_at=now - timedelta(hours=3))  # not queued
    _age(db, "old@a", registry.FORGET_AFTER.total_seconds() + 60)
    with db.session() as s:
        assert registry.forget(s) == 1
        assert [w.name for w in registry.workers(s, lost_after=45)] == ["new@a"]
        assert 89 <= registry.oldest_queued_age(s) < 150


def test_the_heartbeat_thread_registers_beats_and_marks_stopped(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    db = Database(url, pooled=False)
    Base.metadata.create_all(db.engine)
    a = me()
    beat = registry.Heartbeat(db, a, interval=0.1)
    beat.start()

    def last_seen() -> object:
        with db.session() as s:
            return s.scalar(select(Worker.last_seen).where(Worker.name == a.name))

    deadline = time.monotonic() + 10
    while last_seen() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    first = last_seen()
    time.sleep(0.5)
    assert first is not None and last_seen() != first  # beating
    with db.session() as s:  # the row went (forgotten, a restored backup): the next beat registers again
        s.query(Worker).delete()
    time.sleep(0.5)
    assert last_seen() is not None
    beat.stop()
    with db.session() as s:
        w = s.scalars(select(Worker)).one()
    assert w.stopped_at is not None
    db.dispose()


def test_a_heartbeat_without_database_fails_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = Database(f"sqlite:///{tmp_path / 'missing' / 'no.sqlite'}", pooled=False)
    beat = registry.Heartbeat(db, me(), interval=60)
    assert not beat.beat() and not beat.beat()
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == ["worker heartbeat failed"]
    beat.stop()  # logged, not raised


# Routing ------------------------------------------------------------------------------------------


def test_a_worker_consumes_the_queue_of_its_device() -> None:
    assert worker_queues(["analyze", "deliver"], "cpu") == ["analyze", "deliver", "analyze.cpu"]
    assert worker_queues(["analyze"], "cuda") == ["analyze", "analyze.gpu"]
    assert worker_queues(["deliver"], "cuda") == ["deliver"]  # no model, no device queue
    assert worker_queues(["analyze", "analyze.gpu"], "cpu") == ["analyze", "analyze.gpu"]  # named: kept
    assert worker_queues(["analyze.cpu"], "cuda") == ["analyze.cpu"]


def _sqlite(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'q.sqlite'}")
    Base.metadata.create_all(db.engine)
    return db


@pytest.mark.parametrize(
    ("routing", "gpu_alive", "queue"),
    [
        ("any", True, ANALYZE_QUEUE),
        ("any", False, ANALYZE_QUEUE),
        ("gpu-only", False, ANALYZE_GPU_QUEUE),
        ("prefer-gpu", True, ANALYZE_GPU_QUEUE),
        ("prefer-gpu", False, ANALYZE_CPU_QUEUE),
    ],
)
def test_analysis_jobs_are_routed_by_device(
    tmp_path: Path, routing: str, gpu_alive: bool, queue: str
) -> None:
    db = _sqlite(tmp_path)
    if gpu_alive:
        with db.session() as s:
            registry.register(s, me("g@gpu", device="cuda"))
    q = TaskQueue(Settings(data_dir=tmp_path, analyze_routing=routing), db)  # type: ignore[arg-type]
    try:
        assert q.analyze_queue() == queue
        q.enqueue_analysis(7)
        q.enqueue_analysis(8, countdown=30)
        assert q.depths() == {name: 2 if name == queue else 0 for name in QUEUES}
    finally:
        q.close()
        db.dispose()


def test_prefer_gpu_reads_the_registry_every_few_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = _sqlite(tmp_path)
    q = TaskQueue(Settings(data_dir=tmp_path, analyze_routing="prefer-gpu"), db)
    clock = [1000.0]
    monkeypatch.setattr("service.core.queue.time.monotonic", lambda: clock[0])
    assert q.analyze_queue() == ANALYZE_CPU_QUEUE
    with db.session() as s:
        registry.register(s, me("g@gpu", device="cuda"))
    clock[0] += 4.9
    assert q.analyze_queue() == ANALYZE_CPU_QUEUE  # the decision is kept a few seconds
    clock[0] += 0.2
    assert q.analyze_queue() == ANALYZE_GPU_QUEUE
    _age(db, "g@gpu", 60)  # the GPU host went away
    clock[0] += 5.1
    assert q.analyze_queue() == ANALYZE_CPU_QUEUE
    # a registry that cannot be read keeps the last decision; with none, the shared queue
    db.dispose()
    monkeypatch.setattr(q, "_gpu_worker_alive", lambda: 1 / 0)
    clock[0] += 5.1
    assert q.analyze_queue() == ANALYZE_CPU_QUEUE
    q._route = None
    assert q.analyze_queue() == ANALYZE_QUEUE
    assert "worker registry not readable: routing unchanged" in caplog.text


@pytest.mark.redis
def test_queue_depths_on_redis(tmp_path: Path, redis_url: str) -> None:
    """LLEN of each queue's lists (kombu adds one per priority step); a countdown message is held
    by no list until a worker fetches it, so it is not counted as waiting."""
    q = TaskQueue(Settings(data_dir=tmp_path, broker_url=redis_url, analyze_routing="gpu-only"))
    try:
        q.enqueue_analysis(1)
        q.enqueue_analysis(2)
        q.enqueue_delivery(3)
        q.producer.send_task("lusai.analyze", args=[4], queue=ANALYZE_QUEUE, priority=5)
        assert q.depths() == {
            ANALYZE_QUEUE: 1,
            ANALYZE_GPU_QUEUE: 2,
            ANALYZE_CPU_QUEUE: 0,
            DELIVER_QUEUE: 1,
        }
    finally:
        q.close()


def test_the_lost_threshold_follows_the_heartbeat(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path).lost_after == 45.0  # 3 x 10 s + 15 s
    assert Settings(data_dir=tmp_path, heartbeat_interval=2).lost_after == 21.0
    assert Settings(data_dir=tmp_path, heartbeat_interval=2, worker_lost_after=10).lost_after == 10.0
    with pytest.raises(ValueError, match="LUSAI_WORKER_LOST_AFTER must be longer"):
        Settings(data_dir=tmp_path, heartbeat_interval=10, worker_lost_after=10)


def test_jobs_of_a_lost_worker_are_found_through_their_worker_name(db: Database) -> None:
    """What the recovery sweep relies on: the claim records the worker's registry name."""
    with db.session() as s:
        job_id = add_job(s, add_instance(s), JobState.QUEUED, attempts=0)
        assert lifecycle.claim(s, job_id, "host-a:5", worker_name="lusai-1@host-a")
    with db.session() as s:
        assert s.scalar(select(Job.worker_name).where(Job.id == job_id)) == "lusai-1@host-a"


def test_the_worker_never_forks_in_the_middle_of_a_heartbeat(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression (``lusai serve``): a pool process forked while the heartbeat thread imported a
    module or sat in the database driver inherited that lock held and hung before its first job.
    A fork now waits until the heartbeat in progress is over."""
    import os

    db = _sqlite(tmp_path)
    events: list[str] = []

    def slow_beat(session: object, name: str) -> bool:
        events.append("beat starts")
        time.sleep(0.5)
        events.append("beat ends")
        return True

    monkeypatch.setattr(registry, "beat", slow_beat)
    heartbeat = registry.Heartbeat(db, me(), interval=60)
    heartbeat.start()
    while not events:
        time.sleep(0.01)
    pid = os.fork()
    if pid == 0:  # the child: nothing to do
        os._exit(0)
    events.append("forked")
    os.waitpid(pid, 0)
    assert events == ["beat starts", "beat ends", "forked"]
    monkeypatch.undo()
    heartbeat.stop()
    db.dispose()
