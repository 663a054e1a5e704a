"""A worker whose host vanishes mid-job (SIGSTOP of its whole process group: no heartbeat, no TCP
reset, as a power cut or a pulled cable) on a production deployment (PostgreSQL, Redis, separate
``lusai scp`` and ``lusai worker`` processes, a DCMTK storescp as the PACS).

Its job goes back on the queue once the registry has not heard from it for
``LUSAI_WORKER_LOST_AFTER`` and a second worker does it; when the first comes back (SIGCONT, the
network restored) it finishes its analysis, and its result is discarded: one Result row, each
output delivered once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from sqlalchemy import Engine, create_engine, text

from service.core import registry
from service.core.runtime import Runtime
from tests.conftest import free_port, storescu
from tests.factories import phantom_cine_file
from tests.test_production import Procs

pytestmark = [pytest.mark.slow]

T = TypeVar("T")


def _until(what: str, fn: Callable[[], T | None], timeout: float, procs: Procs, poll: float = 0.05) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"{what}: not within {timeout} s\n{procs.logs()}")


def _rows(engine: Engine, sql: str, **params: Any) -> list[Any]:
    with engine.connect() as c:
        return list(c.execute(text(sql), params))


def _worker_of(engine: Engine, pid: int) -> str | None:
    """The registry name of the live worker started as ``lusai worker`` with PID ``pid``."""
    rows = _rows(
        engine,
        "SELECT name, queues FROM workers WHERE name LIKE :n AND stopped_at IS NULL",
        n=f"lusai-{pid}-%",
    )
    return rows[0].name if rows and "analyze.cpu" in rows[0].queues else None  # JSON: a list


def _logged(path: Path, message: str) -> bool:
    return any(
        json.loads(ln).get("msg") == message for ln in path.read_text().splitlines() if ln.startswith("{")
    )


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.network
def test_a_vanished_worker_s_job_is_redone_once_elsewhere_and_its_late_result_discarded(
    tmp_path: Path, pg_url: str, redis_url: str, storescp: tuple[int, Path]
) -> None:
    pacs_port, received = storescp
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")} | {
        "LUSAI_DATA_DIR": str(tmp_path / "data"),
        "LUSAI_DATABASE_URL": pg_url,
        "LUSAI_BROKER_URL": redis_url,
        "LUSAI_DICOM_PORT": str(free_port()),
        "LUSAI_ALLOWED_CALLING_AES": "SCANNER",
        "LUSAI_DEFAULT_DESTINATION": f"PACS@127.0.0.1:{pacs_port}",
        "LUSAI_LOG_FORMAT": "json",
        "LUSAI_HEARTBEAT_INTERVAL": "1",
        "LUSAI_WORKER_LOST_AFTER": "4",
        "LUSAI_RECOVERY_INTERVAL": "1",
        "LUSAI_ANALYZE_ROUTING": "prefer-gpu",  # no GPU here: both on analyze.cpu, re-sends routed alike
    }
    subprocess.run([sys.executable, "-m", "service", "db", "upgrade"], env=env, check=True, timeout=120)
    engine = create_engine(pg_url)
    procs = Procs(tmp_path)
    try:
        procs.start("scp", ["scp"], env)
        first = procs.start("worker1", ["worker"], env)
        name1 = _until("worker 1 registered", lambda: _worker_of(engine, first.pid), 120, procs)
        cine = phantom_cine_file(tmp_path / "cine.dcm", frames=40, jpeg=False)
        sent = storescu(int(env["LUSAI_DICOM_PORT"]), cine, "LUSAI")
        assert sent.returncode == 0, sent.stderr
        _until(
            "job running on worker 1",
            lambda: _rows(
                engine, "SELECT id FROM jobs WHERE state = 'running' AND worker_name = :n", n=name1
            ),
            120,
            procs,
            poll=0.02,
        )
        os.killpg(first.pid, signal.SIGSTOP)  # the host vanishes: no heartbeat, no connection reset
        stopped = time.monotonic()
        second = procs.start("worker2", ["worker"], env)
        name2 = _until("worker 2 registered", lambda: _worker_of(engine, second.pid), 120, procs)
        _until(
            "job re-queued",
            lambda: _rows(
                engine, "SELECT id FROM jobs WHERE NOT (state = 'running' AND worker_name = :n)", n=name1
            ),
            60,
            procs,
            poll=0.02,
        )
        requeued_s = time.monotonic() - stopped
        [job] = _until(
            "job succeeded on worker 2",
            lambda: _rows(engine, "SELECT * FROM jobs WHERE state = 'succeeded'"),
            180,
            procs,
        )
        done_s = time.monotonic() - stopped
        assert (job.attempts, job.worker_name) == (2, name2), procs.logs()
        deliveries = _until(
            "outputs delivered",
            lambda: (
                (d := _rows(engine, "SELECT * FROM deliveries"))
                and all(r.state == "delivered" for r in d)
                and d
            ),
            120,
            procs,
        )
        # the host comes back: worker 1 finishes its analysis; its result loses to worker 2's
        os.killpg(first.pid, signal.SIGCONT)
        _until(
            "worker 1's late result discarded",
            lambda: _logged(
                tmp_path / "worker1.log",
                "result discarded: the job was cancelled, or re-queued as its worker was lost",
            ),
            180,
            procs,
            poll=0.2,
        )
        back = _until(
            "worker 1 heartbeating again",
            lambda: _rows(
                engine,
                "SELECT * FROM workers WHERE name = :n AND last_seen > now() - interval '3 s'",
                n=name1,
            ),
            30,
            procs,
        )
        time.sleep(2)  # anything worker 1 might still send would be on its way by now
        [result] = _rows(engine, "SELECT * FROM results")
        assert result.job_id == job.id
        [job_after] = _rows(engine, "SELECT * FROM jobs")
        assert (job_after.state, job_after.attempts, job_after.worker_name) == ("succeeded", 2, name2)
        after = _rows(engine, "SELECT * FROM deliveries")
        assert len(after) == len(deliveries) >= 2  # SEG and SR
        assert all(d.state == "delivered" and d.attempts == 1 for d in after)
        arrived = [pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in received.iterdir()]
        assert sorted(arrived) == sorted(d.sop_instance_uid for d in after)  # each output once
        counts = {r.name: (r.jobs_done, r.jobs_failed) for r in _rows(engine, "SELECT * FROM workers")}
        assert counts[name2] == (1, 0) and counts[name1] == (0, 0)  # a discarded result counts for nothing
        assert back[0].stopped_at is None
        print(f"\nlost worker: job re-queued {requeued_s:.1f} s after SIGSTOP, done {done_s:.1f} s after it")
        assert requeued_s < 4 + 1 + 1 + 5  # lost_after + sweep interval + heartbeat phase + slack
    finally:
        for p in procs.procs:  # a stopped process group would ignore the SIGTERM below
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGCONT)
        procs.stop_all()
    # a clean stop: each worker marks itself stopped
    stopped_rows = _rows(engine, "SELECT name, stopped_at FROM workers")
    engine.dispose()
    assert stopped_rows and all(r.stopped_at is not None for r in stopped_rows), stopped_rows


def test_a_worker_heartbeats_through_a_long_analysis(runtime: Runtime, tmp_path: Path) -> None:
    """The heartbeat comes from the worker's main process, not from the pool process that runs
    the network: a long CPU analysis never makes its worker look lost (embedded defaults)."""
    from service.core.ingest import ingest_file

    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")} | {
        "LUSAI_DATA_DIR": str(runtime.settings.data_dir),
        "LUSAI_HEARTBEAT_INTERVAL": "0.3",
        "LUSAI_WORKER_LOST_AFTER": "1",
        "LUSAI_LOG_FORMAT": "json",
    }
    procs = Procs(tmp_path)
    engine = runtime.db.engine
    try:
        worker = procs.start("worker", ["worker", "--queues", "analyze"], env)
        _until("worker registered", lambda: _worker_of(engine, worker.pid), 120, procs)
        tmp = runtime.store.new_temp()
        tmp.write_bytes(phantom_cine_file(tmp_path / "long.dcm", frames=400).read_bytes())
        job_id = ingest_file(tmp, calling_ae=None, runtime=runtime).job_id
        _until(
            "job running",
            lambda: _rows(engine, "SELECT id FROM jobs WHERE state = 'running'"),
            120,
            procs,
            0.02,
        )
        began, oldest = time.monotonic(), 0.0
        while _rows(engine, "SELECT id FROM jobs WHERE state = 'running'"):
            with runtime.db.session() as s:
                [w] = registry.workers(s, lost_after=1.0)
            oldest = max(oldest, w.last_seen_s)
            time.sleep(0.1)
        ran = time.monotonic() - began
        [job] = _rows(engine, "SELECT state, attempts FROM jobs WHERE id = :j", j=job_id)
    finally:
        procs.stop_all()
    print(f"\nlong analysis: {ran:.1f} s, oldest heartbeat seen {oldest:.2f} s")
    assert tuple(job) == ("succeeded", 1), procs.logs()
    assert ran >= 2.0, f"the analysis took {ran:.1f} s only: too short to tell"
    assert oldest < 1.0, f"last heartbeat {oldest:.2f} s old during a {ran:.1f} s analysis"
