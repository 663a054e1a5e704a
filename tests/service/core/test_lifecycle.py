"""The job and delivery state machines on a real database: every transition's allowed and refused
source states, races between two sessions, the backoff numbers and the recovery rule."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from service.core import lifecycle
from service.core.db import make_engine
from service.core.models import (
    Base,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Result,
    Worker,
)
from tests.rows import add_delivery, add_instance, add_job

J, D = JobState, DeliveryState
NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty schema from the models: SQLite, or a throw-away PostgreSQL database for the tests
    marked :data:`BOTH` (locking, isolation and time zones are where the two differ)."""
    if getattr(request, "param", "sqlite") == "sqlite":
        url = f"sqlite:///{tmp_path / 'lusai.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
    eng = make_engine(url)
    Base.metadata.create_all(eng)
    yield eng
    eng.dispose()


#: Run on SQLite and on PostgreSQL (each PostgreSQL database costs a second: only where it matters).
BOTH = pytest.mark.parametrize(
    "engine", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(bind=engine, expire_on_commit=False)


@pytest.fixture
def instance_id(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as s:
        return add_instance(s)


def _job(sessions: sessionmaker[Session], instance_id: int, state: JobState, **values: Any) -> int:
    """A job row in ``state``, written directly: the test's starting point, not a transition."""
    with sessions.begin() as s:
        return add_job(s, instance_id, state, **values)


def _delivery(
    sessions: sessionmaker[Session], state: DeliveryState, uid: str = "9.9.1", **values: Any
) -> int:
    with sessions.begin() as s:
        return add_delivery(s, state, uid, **values)


def _get_job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job


def _get_delivery(sessions: sessionmaker[Session], delivery_id: int) -> Delivery:
    with sessions() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        return d


def _utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for aware columns; PostgreSQL aware ones."""
    return value if value is None or value.tzinfo else value.replace(tzinfo=UTC)


# Backoff ------------------------------------------------------------------------------------------


def test_backoff_numbers_are_todays() -> None:
    assert [lifecycle.JOB_BACKOFF.delay(n) for n in range(1, 7)] == [10, 20, 40, 80, 160, 300]
    assert [lifecycle.DELIVERY_BACKOFF.delay(n) for n in (1, 2, 3, 8, 9)] == [15, 30, 60, 1920, 3600]
    assert lifecycle.DELIVERY_MAX_ATTEMPTS == 12
    for policy in (lifecycle.JOB_BACKOFF, lifecycle.DELIVERY_BACKOFF):
        assert policy.delay(0) == policy.base_s  # before any attempt: the first wait
        assert policy.delay(10_000) == policy.cap_s  # no float overflow however long it failed
    with pytest.raises(AttributeError):
        lifecycle.JOB_BACKOFF.base_s = 1.0  # type: ignore[misc]  # one policy, not tweaked in place


PG_ONLY = pytest.mark.parametrize(
    "engine", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


def _clock_off(monkeypatch: pytest.MonkeyPatch, offset: timedelta) -> None:
    """This process's wall clock ``offset`` away from the database server's (a host off by hours)."""

    class Off(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> datetime:  # type: ignore[override]
            return datetime.now(tz) + offset

    monkeypatch.setattr(lifecycle, "datetime", Off)


def _result(s: Session, job_id: int) -> int:
    inst = s.get(Job, job_id).instance_id  # type: ignore[union-attr]
    result = Result(job_id=job_id, instance_id=inst, model_name="m", model_version="1", weights_sha256="0")
    s.add(result)
    s.flush()
    return result.id


@PG_ONLY
@pytest.mark.parametrize("offset", [timedelta(hours=-2), timedelta(hours=2)])
def test_a_worker_clock_hours_off_makes_no_job_or_delivery_look_lost(
    sessions: sessionmaker[Session], instance_id: int, monkeypatch: pytest.MonkeyPatch, offset: timedelta
) -> None:
    """Regression (bench/chaos/faults.py clock_jump): a worker under ``faketime -2h`` stamped
    started_at with its own clock, and the SCP's recovery sweep declared its running job stale at
    once; one under +2h made every queued job look lost to its own sweep. Stamps and comparisons
    now use the database server's clock."""
    job = _job(sessions, instance_id, JobState.QUEUED)
    with sessions.begin() as s:  # the SCP's host, right time
        assert lifecycle.mark_enqueued(s, job)
        queued = add_job(s, instance_id, JobState.QUEUED)
        assert lifecycle.mark_enqueued(s, queued)
    _clock_off(monkeypatch, offset)  # the worker's host
    with sessions.begin() as s:
        assert lifecycle.claim(s, job, "off-clock:1")
        d = lifecycle.upsert_delivery(
            s, result_id=_result(s, job), destination="PACS@h:104", sop_class_uid="1.2",
            sop_instance_uid="9.8.7", storage_key="k", study_uid="1.2.3",
        )  # fmt: skip
    for clock in (offset, timedelta(0)):  # its own sweep, then a sweep on a host with the right time
        _clock_off(monkeypatch, clock)
        with sessions.begin() as s:
            stale = lifecycle.requeue_stale(
                s, stale_after=timedelta(minutes=30), lost_after=timedelta(minutes=15), max_attempts=3
            )
            assert stale == [] and d not in lifecycle.lost_deliveries(s)
    with sessions.begin() as s:
        assert s.get(Job, job).state == JobState.RUNNING  # type: ignore[union-attr]


def test_a_delivery_outlives_a_pacs_down_for_hours() -> None:
    """Regression (bench/chaos/faults.py pacs_down): with 8 attempts a delivery was dead 32 min
    into a PACS outage, so an hour's maintenance lost results. The last attempt now comes >= 4 h
    after the first."""
    waited = sum(lifecycle.DELIVERY_BACKOFF.delay(a) for a in range(1, lifecycle.DELIVERY_MAX_ATTEMPTS))
    assert waited >= 4 * 3600


# Jobs: allowed and refused source states ----------------------------------------------------------

JobMove = Callable[[Session, int], bool]
JOB_MOVES: dict[str, tuple[JobMove, set[JobState], JobState]] = {
    "claim": (lambda s, j: lifecycle.claim(s, j, "host:1", now=NOW), {J.QUEUED, J.RETRYING}, J.RUNNING),
    "succeed": (
        lambda s, j: lifecycle.succeed(s, j, model_version="2.0.0", timings_ms={"infer": 80.04}, now=NOW),
        {J.QUEUED, J.RUNNING, J.RETRYING, J.SUCCEEDED},
        J.SUCCEEDED,
    ),
    "fail": (lambda s, j: lifecycle.fail(s, j, "input rejected: bad", now=NOW), {J.RUNNING}, J.FAILED),
    "cancel": (lambda s, j: lifecycle.cancel(s, j, now=NOW), {J.QUEUED, J.RUNNING, J.RETRYING}, J.CANCELLED),
}


@pytest.mark.parametrize("name", list(JOB_MOVES))
def test_job_transition_sources(sessions: sessionmaker[Session], instance_id: int, name: str) -> None:
    """One job in each state; the transition wins exactly from its allowed states."""
    move, allowed, target = JOB_MOVES[name]
    jobs = {source: _job(sessions, instance_id, source) for source in JobState}
    with sessions.begin() as s:
        won = {source: move(s, job_id) for source, job_id in jobs.items()}
    assert {source for source, w in won.items() if w} == allowed
    after = {source: _get_job(sessions, job_id).state for source, job_id in jobs.items()}
    assert after == {source: target if source in allowed else source for source in JobState}


@BOTH
def test_claim_writes_the_attempt(sessions: sessionmaker[Session], instance_id: int) -> None:
    job_id = _job(sessions, instance_id, J.RETRYING, attempts=1, error="boom")
    with sessions.begin() as s:
        assert lifecycle.claim(s, job_id, "w" * 300, now=NOW)
    job = _get_job(sessions, job_id)
    assert job.attempts == 2 and _utc(job.started_at) == NOW and job.worker == "w" * 128 and job.error is None


def test_succeed_records_model_and_timings(sessions: sessionmaker[Session], instance_id: int) -> None:
    job_id = _job(sessions, instance_id, J.RUNNING)
    with sessions.begin() as s:
        assert lifecycle.succeed(s, job_id, model_version="2.0.0", timings_ms={"infer": 80.04}, now=NOW)
    job = _get_job(sessions, job_id)
    assert job.model_version == "2.0.0" and job.timings_ms == {"infer": 80.0} and _utc(job.finished_at) == NOW


def test_cancel_and_fail_stamp_finished_at(sessions: sessionmaker[Session], instance_id: int) -> None:
    cancelled = _job(sessions, instance_id, J.QUEUED)
    failed = _job(sessions, instance_id, J.RUNNING)
    with sessions.begin() as s:
        assert lifecycle.cancel(s, cancelled, now=NOW)
        assert lifecycle.fail(s, failed, "x" * 5000, now=NOW)
    assert _utc(_get_job(sessions, cancelled).finished_at) == NOW
    job = _get_job(sessions, failed)
    assert _utc(job.finished_at) == NOW and job.error == "x" * lifecycle.MAX_ERROR_CHARS


@BOTH
def test_fail_or_retry_retries_with_backoff(sessions: sessionmaker[Session], instance_id: int) -> None:
    for attempts, countdown in [(1, 10.0), (2, 20.0)]:
        job_id = _job(sessions, instance_id, J.RUNNING, attempts=attempts)
        with sessions.begin() as s:
            assert lifecycle.fail_or_retry(s, job_id, "OSError: disk", max_attempts=3, now=NOW) == countdown
        job = _get_job(sessions, job_id)
        assert job.state == J.RETRYING and job.error == "OSError: disk" and _utc(job.enqueued_at) == NOW
        assert job.finished_at is None and job.attempts == attempts  # the next claim counts the attempt


def test_fail_or_retry_fails_on_the_last_attempt(sessions: sessionmaker[Session], instance_id: int) -> None:
    job_id = _job(sessions, instance_id, J.RUNNING, attempts=3)
    with sessions.begin() as s:
        assert lifecycle.fail_or_retry(s, job_id, "OSError: disk", max_attempts=3, now=NOW) is None
    job = _get_job(sessions, job_id)
    assert job.state == J.FAILED and job.error == "OSError: disk" and _utc(job.finished_at) == NOW


def test_fail_or_retry_leaves_a_job_that_is_not_running(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    jobs = {source: _job(sessions, instance_id, source) for source in JobState if source != J.RUNNING}
    with sessions.begin() as s:
        assert all(lifecycle.fail_or_retry(s, j, "late", max_attempts=3) is None for j in jobs.values())
        assert lifecycle.fail_or_retry(s, 987654, "gone", max_attempts=3) is None
    for source, job_id in jobs.items():
        job = _get_job(sessions, job_id)
        assert job.state == source and job.error is None


def test_new_job_and_rerun(sessions: sessionmaker[Session], instance_id: int) -> None:
    with sessions.begin() as s:
        first = lifecycle.new_job(s, instance_id)
        assert first.id and first.state == J.QUEUED and first.attempts == 0
        assert lifecycle.rerun(s, instance_id, model_version="2.0.0") is None  # one is active
        assert lifecycle.active_job(s, instance_id) == first.id
        assert lifecycle.cancel(s, first.id)
        assert lifecycle.active_job(s, instance_id) is None
        again = lifecycle.rerun(s, instance_id, model_version="2.0.0")
        assert again is not None and again.state == J.QUEUED and again.model_version == "2.0.0"


def test_mark_enqueued_stamps_once(sessions: sessionmaker[Session], instance_id: int) -> None:
    job_id = _job(sessions, instance_id, J.QUEUED)
    with sessions.begin() as s:
        assert lifecycle.mark_enqueued(s, job_id, now=NOW)
        assert not lifecycle.mark_enqueued(s, job_id, now=NOW + timedelta(hours=1))
    assert _utc(_get_job(sessions, job_id).enqueued_at) == NOW


def test_enqueue_sends_then_stamps(sessions: sessionmaker[Session], instance_id: int) -> None:
    sent: list[int] = []
    up, down = _job(sessions, instance_id, J.QUEUED), _job(sessions, instance_id, J.QUEUED)

    def broker_down(job_id: int) -> None:
        raise ConnectionError("redis://127.0.0.1:1")

    with sessions.begin() as s:
        assert lifecycle.enqueue(s, up, sent.append)
        assert not lifecycle.enqueue(s, down, broker_down)
    assert sent == [up]
    assert _get_job(sessions, up).enqueued_at is not None
    assert _get_job(sessions, down).enqueued_at is None  # the recovery sweep sends it later


@BOTH
def test_a_loaded_row_is_read_again_after_a_transition(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    job_id = _job(sessions, instance_id, J.RUNNING)
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == J.RUNNING
        with sessions.begin() as other:  # the API cancels meanwhile
            assert lifecycle.cancel(other, job_id)
        assert not lifecycle.succeed(s, job_id, model_version="1", timings_ms={})
        assert job.state == J.CANCELLED  # not the RUNNING it was loaded with, nor a guessed SUCCEEDED
        s.commit()


# Races: two sessions, one winner ------------------------------------------------------------------


def _race(sessions: sessionmaker[Session], *moves: Callable[[Session], bool]) -> list[bool]:
    """Run each move in its own thread and session, released together; returns who won."""
    start = threading.Barrier(len(moves))
    won: list[bool | None] = [None] * len(moves)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            with sessions() as s:
                start.wait(timeout=10)
                won[i] = moves[i](s)
                s.commit()
        except BaseException as exc:  # surfaced below: a thread's exception is otherwise lost
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(moves))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return [bool(w) for w in won]


@BOTH
def test_two_claims_of_one_job_exactly_one_wins(sessions: sessionmaker[Session], instance_id: int) -> None:
    for _ in range(3):
        job_id = _job(sessions, instance_id, J.QUEUED, attempts=0)
        won = _race(
            sessions, *[partial(lifecycle.claim, job_id=job_id, worker=f"worker:{i}") for i in range(2)]
        )
        assert sorted(won) == [False, True]
        job = _get_job(sessions, job_id)
        assert job.state == J.RUNNING and job.attempts == 1
        assert job.worker == f"worker:{won.index(True)}"
    with sessions.begin() as s:  # and one after the other: the second claim loses as well
        assert not lifecycle.claim(s, job_id, "late:1")


@BOTH
def test_cancel_against_succeed_one_wins(sessions: sessionmaker[Session], instance_id: int) -> None:
    for _ in range(3):
        job_id = _job(sessions, instance_id, J.RUNNING)
        cancel_won, succeed_won = _race(
            sessions,
            partial(lifecycle.cancel, job_id=job_id),
            partial(lifecycle.succeed, job_id=job_id, model_version="1", timings_ms={}),
        )
        assert cancel_won != succeed_won
        assert _get_job(sessions, job_id).state == (J.CANCELLED if cancel_won else J.SUCCEEDED)


@BOTH
def test_a_retry_not_due_yet_is_not_sent(sessions: sessionmaker[Session]) -> None:
    """Regression (bench/chaos/faults.py pacs_down): every message for a RETRYING delivery took an
    attempt, so the recovery sweeps of two processes and the earlier countdown dead-lettered a
    delivery within minutes of an outage instead of hours. Only a due retry is sent now."""
    later = _delivery(sessions, D.RETRYING, uid="9.5.1", next_attempt_at=NOW + timedelta(minutes=4))
    due = _delivery(sessions, D.RETRYING, uid="9.5.2", next_attempt_at=NOW + lifecycle.DELIVERY_DUE_SLACK)
    with sessions.begin() as s:
        assert not lifecycle.start_sending(s, later, now=NOW)
        assert lifecycle.start_sending(s, due, now=NOW)
    assert _get_delivery(sessions, later).attempts == 1 and _get_delivery(sessions, later).state == D.RETRYING
    assert _get_delivery(sessions, due).attempts == 2
    with sessions.begin() as s:  # its time come, it goes
        assert lifecycle.start_sending(s, later, now=NOW + timedelta(minutes=4))


@BOTH
def test_resend_against_start_sending(sessions: sessionmaker[Session]) -> None:
    """A re-send wins only before the worker picks the row up; after that it is refused, so a
    send in progress never gets its attempt count reset under it."""
    for n in range(3):
        delivery_id = _delivery(sessions, D.RETRYING, uid=f"9.9.{n}", attempts=2)
        resend_won, start_won = _race(
            sessions,
            partial(lifecycle.resend, delivery_id=delivery_id),
            partial(lifecycle.start_sending, delivery_id=delivery_id),
        )
        d = _get_delivery(sessions, delivery_id)
        assert start_won and d.state == D.SENDING
        assert d.attempts == (1 if resend_won else 3)


# The recovery rule --------------------------------------------------------------------------------


@BOTH
def test_requeue_stale(sessions: sessionmaker[Session], instance_id: int) -> None:
    old, recent = NOW - timedelta(hours=2), NOW - timedelta(seconds=30)
    never_sent = _job(sessions, instance_id, J.QUEUED)
    sent_recently = _job(sessions, instance_id, J.QUEUED, enqueued_at=recent)
    retry_lost = _job(sessions, instance_id, J.RETRYING, enqueued_at=old)
    retry_unsent = _job(sessions, instance_id, J.RETRYING)
    worker_lost = _job(sessions, instance_id, J.RUNNING, attempts=1, started_at=old, enqueued_at=old)
    worker_lost_last = _job(sessions, instance_id, J.RUNNING, attempts=3, started_at=old)
    running = _job(sessions, instance_id, J.RUNNING, attempts=1, started_at=recent)
    done = _job(sessions, instance_id, J.SUCCEEDED)
    with sessions.begin() as s:
        ids = lifecycle.requeue_stale(
            s, stale_after=timedelta(minutes=30), lost_after=timedelta(minutes=15), max_attempts=3, now=NOW
        )
    assert sorted(ids) == sorted([never_sent, retry_lost, retry_unsent, worker_lost])
    requeued = [_get_job(sessions, j) for j in (never_sent, retry_lost, retry_unsent, worker_lost)]
    assert [j.state for j in requeued] == [J.QUEUED, J.RETRYING, J.RETRYING, J.QUEUED]
    assert all(j.enqueued_at is None for j in requeued)  # unsent until enqueue stamps them
    assert requeued[-1].attempts == 1  # the next claim counts the attempt
    assert _utc(_get_job(sessions, sent_recently).enqueued_at) == recent
    assert _get_job(sessions, running).state == J.RUNNING and _get_job(sessions, done).state == J.SUCCEEDED
    lost = _get_job(sessions, worker_lost_last)
    assert lost.state == J.FAILED and lost.error == "worker lost on the last attempt"
    assert _utc(lost.finished_at) == NOW


def test_requeue_abandoned(sessions: sessionmaker[Session], instance_id: int) -> None:
    """Jobs held by killed worker processes go back at once, whatever their age; others stay."""
    held = _job(sessions, instance_id, J.RUNNING, attempts=1, started_at=NOW, worker="h:1")
    held_last = _job(sessions, instance_id, J.RUNNING, attempts=3, started_at=NOW, worker="h:2")
    alive = _job(sessions, instance_id, J.RUNNING, attempts=1, started_at=NOW, worker="h:3")
    finished = _job(sessions, instance_id, J.SUCCEEDED, worker="h:1")
    with sessions.begin() as s:
        assert lifecycle.requeue_abandoned(s, {"h:1", "h:2"}, max_attempts=3) == [held]
    job = _get_job(sessions, held)
    assert job.state == J.QUEUED and job.enqueued_at is None and job.attempts == 1
    assert _get_job(sessions, held_last).state == J.FAILED
    assert _get_job(sessions, alive).state == J.RUNNING
    assert _get_job(sessions, finished).state == J.SUCCEEDED
    with sessions.begin() as s:
        assert lifecycle.requeue_abandoned(s, set(), max_attempts=3) == []


def _worker_row(sessions: sessionmaker[Session], name: str, **values: Any) -> None:
    """A worker registry row, written directly (seen at NOW, started an hour before, running)."""
    row = {
        "host": "h",
        "pid": 1,
        "queues": ["analyze"],
        "device": "cpu",
        "version": "0",
        "started_at": NOW - timedelta(hours=1),
        "last_seen": NOW,
    } | values
    with sessions.begin() as s:
        s.add(Worker(name=name, **row))


@BOTH
def test_requeue_lost_workers(sessions: sessionmaker[Session], instance_id: int) -> None:
    """A running job goes back at once when its worker is lost (no heartbeat for lost_after),
    stopped, or started again since it claimed the job; a live worker's, an unnamed or an unknown
    worker's job waits for requeue_stale; on its last attempt the job fails."""
    lost_after = timedelta(seconds=45)
    _worker_row(sessions, "alive@a")
    _worker_row(sessions, "late@a", last_seen=NOW - timedelta(seconds=40))  # within lost_after: alive
    _worker_row(sessions, "lost@b", last_seen=NOW - timedelta(seconds=46))
    _worker_row(sessions, "stopped@c", stopped_at=NOW - timedelta(seconds=5))
    _worker_row(sessions, "restarted@d", started_at=NOW - timedelta(seconds=10))
    claimed = NOW - timedelta(minutes=1)

    def running(name: str | None, attempts: int = 1) -> int:
        return _job(sessions, instance_id, J.RUNNING, attempts=attempts, started_at=claimed, worker_name=name)

    alive, late, lost, stopped, restarted = (
        running(n) for n in ("alive@a", "late@a", "lost@b", "stopped@c", "restarted@d")
    )
    lost_last = running("lost@b", attempts=3)
    unnamed, unknown = running(None), running("never-registered@x")
    queued = _job(sessions, instance_id, J.QUEUED, worker_name="lost@b")
    with sessions.begin() as s:
        ids = lifecycle.requeue_lost_workers(s, lost_after=lost_after, max_attempts=3, now=NOW)
    assert sorted(ids) == sorted([lost, stopped, restarted])
    for job_id in ids:
        job = _get_job(sessions, job_id)
        assert job.state == J.QUEUED and job.enqueued_at is None and job.attempts == 1
    for job_id in (alive, late, unnamed, unknown):
        assert _get_job(sessions, job_id).state == J.RUNNING
    assert _get_job(sessions, queued).state == J.QUEUED
    failed = _get_job(sessions, lost_last)
    assert (failed.state, failed.error) == (J.FAILED, "worker lost on the last attempt")
    with sessions.begin() as s:  # nothing left to do: a second sweep (another process) finds nothing
        assert lifecycle.requeue_lost_workers(s, lost_after=lost_after, max_attempts=3, now=NOW) == []


@BOTH
def test_a_worker_that_comes_back_cannot_end_the_attempt_it_lost(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    """Worker A is declared lost mid-job: its job is re-queued and claimed by B. When A comes back
    (its network restored) and finishes, every transition that ends an attempt loses for it; B's wins."""
    job_id = _job(sessions, instance_id, J.QUEUED, attempts=0)
    with sessions.begin() as s:
        assert lifecycle.claim(s, job_id, "host-a:11", worker_name="a@host-a", now=NOW)
        a = lifecycle.attempt_of(s, job_id)
    assert a == lifecycle.Attempt("host-a:11", 1)
    assert _get_job(sessions, job_id).worker_name == "a@host-a"
    _worker_row(sessions, "a@host-a", last_seen=NOW - timedelta(minutes=5))
    with sessions.begin() as s:
        assert lifecycle.requeue_lost_workers(s, lost_after=timedelta(seconds=45), max_attempts=3) == [job_id]

    def a_ends(s: Session) -> list[object]:
        return [
            lifecycle.succeed(s, job_id, model_version="1", timings_ms={}, attempt=a),
            lifecycle.fail(s, job_id, "input rejected", attempt=a),
            lifecycle.fail_or_retry(s, job_id, "boom", max_attempts=3, attempt=a),
            lifecycle.retry_when_space(s, job_id, "full", attempt=a),
        ]

    with sessions.begin() as s:  # re-queued, not claimed yet
        assert a_ends(s) == [False, False, None, None]
    assert _get_job(sessions, job_id).state == J.QUEUED
    with sessions.begin() as s:
        assert lifecycle.claim(s, job_id, "host-b:22", worker_name="b@host-b")
        b = lifecycle.attempt_of(s, job_id)
    assert b == lifecycle.Attempt("host-b:22", 2)
    with sessions.begin() as s:  # claimed by B: A still loses, and B's job is left as it was
        assert a_ends(s) == [False, False, None, None]
    job = _get_job(sessions, job_id)
    assert (job.state, job.worker, job.worker_name, job.attempts, job.error) == (
        J.RUNNING,
        "host-b:22",
        "b@host-b",
        2,
        None,
    )
    # the same process claiming the job again makes another attempt: the old one still loses
    with sessions.begin() as s:
        assert not lifecycle.succeed(s, job_id, model_version="1", timings_ms={}, attempt=a)
        assert lifecycle.succeed(s, job_id, model_version="1", timings_ms={}, attempt=b)
    assert _get_job(sessions, job_id).state == J.SUCCEEDED
    with sessions.begin() as s:  # a late repeat of B's own outcome changes nothing either
        assert not lifecycle.succeed(s, job_id, model_version="1", timings_ms={}, attempt=b)


def test_an_attempt_ends_its_own_claim(sessions: sessionmaker[Session], instance_id: int) -> None:
    """With the claim that holds the job, each ending transition wins as before."""
    for end, state in [
        (lambda s, j, a: lifecycle.fail(s, j, "input rejected", attempt=a), J.FAILED),
        (
            lambda s, j, a: lifecycle.fail_or_retry(s, j, "boom", max_attempts=3, attempt=a) == 10.0,
            J.RETRYING,
        ),
        (lambda s, j, a: lifecycle.retry_when_space(s, j, "full", attempt=a) is not None, J.RETRYING),
    ]:
        job_id = _job(sessions, instance_id, J.QUEUED, attempts=0)
        with sessions.begin() as s:
            assert lifecycle.claim(s, job_id, "h:1")
            attempt = lifecycle.attempt_of(s, job_id)
            assert attempt is not None and end(s, job_id, attempt)
        assert _get_job(sessions, job_id).state == state


# Deliveries ---------------------------------------------------------------------------------------

DeliveryMove = Callable[[Session, int], bool]
DELIVERY_MOVES: dict[str, tuple[DeliveryMove, set[DeliveryState], DeliveryState]] = {
    "start_sending": (lifecycle.start_sending, {D.PENDING, D.RETRYING, D.SENDING}, D.SENDING),
    "delivered": (lambda s, d: lifecycle.delivered(s, d, now=NOW), {D.SENDING}, D.DELIVERED),
    "resend": (
        lambda s, d: lifecycle.resend(s, d, now=NOW),
        {D.PENDING, D.RETRYING, D.DELIVERED, D.DEAD, D.WAITING},
        D.PENDING,
    ),
}


@pytest.mark.parametrize("name", list(DELIVERY_MOVES))
def test_delivery_transition_sources(sessions: sessionmaker[Session], name: str) -> None:
    """One delivery in each state; the transition wins exactly from its allowed states."""
    move, allowed, target = DELIVERY_MOVES[name]
    rows = {
        source: _delivery(sessions, source, uid=f"9.8.{i}", attempts=2, last_error="peer down")
        for i, source in enumerate(DeliveryState)
    }
    with sessions.begin() as s:
        won = {source: move(s, delivery_id) for source, delivery_id in rows.items()}
    assert {source for source, w in won.items() if w} == allowed
    for source, delivery_id in rows.items():
        d = _get_delivery(sessions, delivery_id)
        assert d.state == (target if source in allowed else source)
        if source not in allowed:
            assert d.attempts == 2 and d.last_error == "peer down"
        elif name == "start_sending":
            assert d.attempts == 3
        elif name == "delivered":
            assert _utc(d.delivered_at) == NOW and d.last_error is None and d.next_attempt_at is None
        else:
            assert d.attempts == 0 and d.last_error is None and _utc(d.next_attempt_at) == NOW


def test_resend_refuses_a_delivery_being_sent(sessions: sessionmaker[Session]) -> None:
    delivery_id = _delivery(sessions, D.SENDING, attempts=1)
    with sessions.begin() as s:
        assert not lifecycle.resend(s, delivery_id)
    d = _get_delivery(sessions, delivery_id)
    assert d.state == D.SENDING and d.attempts == 1


@BOTH
def test_fail_or_retry_delivery(sessions: sessionmaker[Session]) -> None:
    cases = [
        (1, False, D.RETRYING, 15.0),
        (3, False, D.RETRYING, 60.0),
        (8, False, D.RETRYING, 1920.0),
        (12, False, D.DEAD, None),
        (1, True, D.DEAD, None),
    ]
    for n, (attempts, permanent, state, delay) in enumerate(cases):
        delivery_id = _delivery(sessions, D.SENDING, uid=f"9.6.{n}", attempts=attempts)
        with sessions.begin() as s:
            got = lifecycle.fail_or_retry_delivery(s, delivery_id, "refused", permanent=permanent, now=NOW)
        assert got == delay
        d = _get_delivery(sessions, delivery_id)
        assert d.state == state and d.last_error == "refused" and d.attempts == attempts
        assert _utc(d.next_attempt_at) == (None if delay is None else NOW + timedelta(seconds=delay))


def test_fail_or_retry_delivery_leaves_a_row_not_being_sent(sessions: sessionmaker[Session]) -> None:
    rows = {s: _delivery(sessions, s, uid=f"9.7.{i}") for i, s in enumerate(DeliveryState) if s != D.SENDING}
    with sessions.begin() as s:
        assert all(lifecycle.fail_or_retry_delivery(s, d, "late") is None for d in rows.values())
    assert {source: _get_delivery(sessions, d).state for source, d in rows.items()} == {s: s for s in rows}


@BOTH
def test_upsert_delivery(sessions: sessionmaker[Session], instance_id: int) -> None:
    job_id = _job(sessions, instance_id, J.SUCCEEDED)
    with sessions.begin() as s:
        result = Result(
            job_id=job_id, instance_id=instance_id, model_name="m", model_version="1", weights_sha256="0"
        )
        s.add(result)
        s.flush()
        result_id = result.id

    def upsert(s: Session, uid: str, key: str) -> int | None:
        return lifecycle.upsert_delivery(
            s,
            result_id=result_id,
            destination="PACS@127.0.0.1:104",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4",
            sop_instance_uid=uid,
            storage_key=key,
            study_uid="1.2.3",
        )

    with sessions.begin() as s:
        new = upsert(s, "9.9.7", "a")
    assert new is not None and _get_delivery(sessions, new).state == D.PENDING
    done = _delivery(sessions, D.DELIVERED, uid="9.9.8")
    dead = _delivery(sessions, D.DEAD, uid="9.9.9", attempts=8)
    with sessions.begin() as s:
        assert upsert(s, "9.9.8", "b") is None  # the identical object is in PACS already
        assert upsert(s, "9.9.9", "c") == dead
        assert upsert(s, "9.9.7", "d") == new
    kept = _get_delivery(sessions, done)
    assert kept.state == D.DELIVERED and kept.result_id == result_id and kept.storage_key == "objects/k.dcm"
    revived = _get_delivery(sessions, dead)
    assert revived.state == D.PENDING and revived.storage_key == "c" and revived.result_id == result_id


@BOTH
def test_lost_deliveries(sessions: sessionmaker[Session]) -> None:
    fresh = _delivery(sessions, D.PENDING, uid="9.1", created_at=NOW - timedelta(minutes=1))
    pending_lost = _delivery(sessions, D.PENDING, uid="9.2", created_at=NOW - timedelta(minutes=10))
    retry_due = _delivery(sessions, D.RETRYING, uid="9.3", next_attempt_at=NOW + timedelta(minutes=10))
    retry_lost = _delivery(sessions, D.RETRYING, uid="9.4", next_attempt_at=NOW - timedelta(minutes=30))
    sending = _delivery(sessions, D.SENDING, uid="9.5", created_at=NOW - timedelta(minutes=10))
    sending_lost = _delivery(sessions, D.SENDING, uid="9.6", created_at=NOW - timedelta(hours=2))
    _delivery(sessions, D.DEAD, uid="9.7", created_at=NOW - timedelta(days=1))
    with sessions() as s:
        lost = lifecycle.lost_deliveries(s, now=NOW)
    assert sorted(lost) == sorted([pending_lost, retry_lost, sending_lost])
    assert fresh not in lost and retry_due not in lost and sending not in lost


@BOTH
def test_retry_when_space_gives_the_attempt_back_for_a_day(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    young = _job(sessions, instance_id, J.RUNNING, attempts=3, created_at=NOW - timedelta(minutes=2))
    older = _job(sessions, instance_id, J.RUNNING, attempts=1, created_at=NOW - timedelta(hours=3))
    too_old = _job(sessions, instance_id, J.RUNNING, attempts=1, created_at=NOW - timedelta(hours=25))
    queued = _job(sessions, instance_id, J.QUEUED, attempts=0, created_at=NOW)
    with sessions.begin() as s:
        assert (
            lifecycle.retry_when_space(s, young, "storage full", now=NOW) == 30.0
        )  # 2 min / 4 -> 30 s floor
        assert lifecycle.retry_when_space(s, older, "storage full", now=NOW) == lifecycle.JOB_BACKOFF.cap_s
        assert lifecycle.retry_when_space(s, too_old, "storage full", now=NOW) is None
        assert lifecycle.retry_when_space(s, queued, "storage full", now=NOW) is None  # not running
    y = _get_job(sessions, young)
    assert y.state == J.RETRYING and y.attempts == 2 and y.error == "storage full"
    assert _get_job(sessions, older).attempts == 0
    gone = _get_job(sessions, too_old)
    assert gone.state == J.FAILED and gone.error is not None and "waited 1 day" in gone.error
    assert _get_job(sessions, queued).state == J.QUEUED


def test_claim_takes_over_only_from_the_named_dead_worker(
    sessions: sessionmaker[Session], instance_id: int
) -> None:
    job_id = _job(sessions, instance_id, J.QUEUED, attempts=0)
    with sessions.begin() as s:
        assert lifecycle.claim(s, job_id, "host:1")
        # a live holder: a plain claim and a take-over naming someone else both lose
        assert not lifecycle.claim(s, job_id, "host:2")
        assert not lifecycle.claim(s, job_id, "host:2", lost_worker="host:9")
        assert lifecycle.claim(s, job_id, "host:2", lost_worker="host:1")
        # the second taker of the same dead holder finds the job already moved on
        assert not lifecycle.claim(s, job_id, "host:3", lost_worker="host:1")
    job = _get_job(sessions, job_id)
    assert job.state == J.RUNNING and job.worker == "host:2" and job.attempts == 2


# Order per study ----------------------------------------------------------------------------------

STUDY, OTHER_STUDY, PACS, OTHER_PACS = "1.2.3.1", "1.2.3.2", "PACS@127.0.0.1:104", "ARCH@127.0.0.1:105"


@BOTH
def test_a_study_s_outputs_wait_behind_an_older_one_to_the_same_destination(
    sessions: sessionmaker[Session],
) -> None:
    """Regression (bench/chaos/faults.py pacs_down): after an outage each delivery went when its own
    retry came due, so 39 of 48 outputs reached PACS before an older output of their study."""
    head = _delivery(sessions, D.RETRYING, uid="9.1", study_uid=STUDY, next_attempt_at=NOW)
    behind = _delivery(sessions, D.PENDING, uid="9.2", study_uid=STUDY)
    last = _delivery(sessions, D.PENDING, uid="9.3", study_uid=STUDY)
    other_study = _delivery(sessions, D.PENDING, uid="9.4", study_uid=OTHER_STUDY)
    other_pacs = _delivery(sessions, D.PENDING, uid="9.5", study_uid=STUDY, destination=OTHER_PACS)
    no_study = _delivery(sessions, D.PENDING, uid="9.6")  # written before 0007: in no line
    with sessions.begin() as s:
        assert not lifecycle.wait_in_line(s, head)
        assert lifecycle.wait_in_line(s, behind) and lifecycle.wait_in_line(s, last)
        assert not any(lifecycle.wait_in_line(s, d) for d in (other_study, other_pacs, no_study))
        assert not lifecycle.start_sending(s, behind, now=NOW)  # a waiting one is never sent
        assert lifecycle.release_next(s, head) == []  # the head has not ended: nobody moves
    assert _get_delivery(sessions, behind).state == D.WAITING
    for current, following in ((head, behind), (behind, last), (last, None)):
        with sessions.begin() as s:
            assert lifecycle.start_sending(s, current, now=NOW) and lifecycle.delivered(s, current)
            released = lifecycle.release_next(s, current)
        assert released == ([] if following is None else [following])
        if following is not None:  # released exactly once, and now free to go
            assert _get_delivery(sessions, following).state == D.PENDING
            with sessions.begin() as s:
                assert lifecycle.release_next(s, current) == []
                assert not lifecycle.wait_in_line(s, following)


@BOTH
def test_a_dead_delivery_releases_the_next_and_a_resend_joins_the_line_again(
    sessions: sessionmaker[Session],
) -> None:
    first = _delivery(
        sessions, D.SENDING, uid="9.1", study_uid=STUDY, attempts=lifecycle.DELIVERY_MAX_ATTEMPTS
    )
    second = _delivery(sessions, D.WAITING, uid="9.2", study_uid=STUDY)
    with sessions.begin() as s:
        assert lifecycle.fail_or_retry_delivery(s, first, "refused", permanent=True) is None
        assert lifecycle.release_next(s, first) == [second]
    with sessions.begin() as s:  # the dead one sent again by hand: it goes first again
        assert lifecycle.resend(s, first, now=NOW)
        assert lifecycle.wait_in_line(s, second)
        assert not lifecycle.wait_in_line(s, first)


@BOTH
def test_a_destination_that_takes_an_object_wakes_its_retrying_deliveries(
    sessions: sessionmaker[Session],
) -> None:
    later = NOW + timedelta(minutes=40)
    sleeping = [_delivery(sessions, D.RETRYING, uid=f"9.{i}", next_attempt_at=later) for i in range(3)]
    due = _delivery(sessions, D.RETRYING, uid="9.7", next_attempt_at=NOW)
    elsewhere = _delivery(sessions, D.RETRYING, uid="9.8", next_attempt_at=later, destination=OTHER_PACS)
    with sessions.begin() as s:
        assert lifecycle.wake_destination(s, PACS, now=NOW) == sleeping
        assert lifecycle.wake_destination(s, PACS, now=NOW) == []  # once
    assert all(_utc(_get_delivery(sessions, d).next_attempt_at) == NOW for d in sleeping)
    assert _utc(_get_delivery(sessions, due).next_attempt_at) == NOW
    assert _utc(_get_delivery(sessions, elsewhere).next_attempt_at) == later
    with sessions.begin() as s:  # woken means due: the next message sends it
        assert lifecycle.start_sending(s, sleeping[0], now=NOW)


@BOTH
def test_the_recovery_sweep_releases_a_waiting_delivery_that_heads_its_line(
    sessions: sessionmaker[Session],
) -> None:
    stuck = _delivery(sessions, D.WAITING, uid="9.1", study_uid=STUDY)
    _delivery(sessions, D.DELIVERED, uid="9.0", study_uid=OTHER_STUDY)
    behind_stuck = _delivery(sessions, D.WAITING, uid="9.2", study_uid=STUDY)
    head = _delivery(sessions, D.RETRYING, uid="9.3", study_uid=OTHER_STUDY, next_attempt_at=NOW)
    behind_head = _delivery(sessions, D.WAITING, uid="9.4", study_uid=OTHER_STUDY)
    with sessions.begin() as s:
        lost = lifecycle.lost_deliveries(s, now=NOW)
    assert lost == [stuck]
    assert _get_delivery(sessions, stuck).state == D.PENDING
    assert {_get_delivery(sessions, d).state for d in (behind_stuck, behind_head)} == {D.WAITING}
    assert head not in lost


@pytest.mark.postgres
@pytest.mark.parametrize("engine", ["postgres"], indirect=True)
def test_a_delivery_never_waits_behind_one_that_ends_at_the_same_moment(
    sessions: sessionmaker[Session],
) -> None:
    """Race: the older delivery is marked delivered (and releases the next) while the younger one
    decides to wait. Whichever order the two transactions take, the younger one ends up free to
    send: never WAITING with nobody ahead of it."""
    for i in range(25):
        older = _delivery(sessions, D.SENDING, uid=f"9.{i}.1", study_uid=f"{STUDY}.{i}")
        younger = _delivery(sessions, D.PENDING, uid=f"9.{i}.2", study_uid=f"{STUDY}.{i}")
        gate = threading.Barrier(2)

        def end_older(older: int = older, gate: threading.Barrier = gate) -> None:
            with sessions.begin() as s:
                gate.wait()
                assert lifecycle.delivered(s, older)
                lifecycle.release_next(s, older)

        def younger_waits(younger: int = younger, gate: threading.Barrier = gate) -> None:
            with sessions.begin() as s:
                gate.wait()
                lifecycle.wait_in_line(s, younger)

        threads = [threading.Thread(target=end_older), threading.Thread(target=younger_waits)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert _get_delivery(sessions, younger).state == D.PENDING, f"round {i}: left waiting"
