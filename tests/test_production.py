"""Production mode on this machine's real PostgreSQL and Redis: separate SCP and worker processes.

A cine goes in through the SCP (the code path scanners use), a `lusai worker` on the Redis broker
analyses it, and the PostgreSQL rows are checked. A second test kills the worker mid-job and shows
the recovery sweep finishing the job on a new worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from tests.conftest import free_port, storescu
from tests.factories import phantom_cine_file

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.network, pytest.mark.slow]


@pytest.fixture
def prod_env(tmp_path: Path, pg_url: str, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env |= {
        "LUSAI_DATA_DIR": str(tmp_path / "data"),
        "LUSAI_DATABASE_URL": pg_url,
        "LUSAI_BROKER_URL": redis_url,
        "LUSAI_DICOM_PORT": str(free_port()),
        "LUSAI_ALLOWED_CALLING_AES": "SCANNER",
        "LUSAI_LOG_FORMAT": "json",
    }
    subprocess.run([sys.executable, "-m", "service", "db", "upgrade"], env=env, check=True, timeout=120)
    return env


class Procs:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = open(self.tmp_path / f"{name}.log", "ab")  # noqa: SIM115  (the child keeps writing to it)
        p = subprocess.Popen(
            [sys.executable, "-m", "service", *args], env=env, stdout=log, stderr=log, start_new_session=True
        )
        self.procs.append(p)
        return p

    def logs(self) -> str:
        return "\n".join(p.read_text()[-3000:] for p in self.tmp_path.glob("*.log"))

    def stop_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Procs]:
    p = Procs(tmp_path)
    yield p
    p.stop_all()


def _send(env: dict[str, str], path: Path) -> None:
    deadline = time.monotonic() + 30
    while True:
        out = storescu(int(env["LUSAI_DICOM_PORT"]), path, "LUSAI")
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)  # SCP still starting
    assert out.returncode == 0, out.stderr


def _job(url: str) -> tuple[str, int, str | None] | None:
    engine = create_engine(url)
    try:
        with engine.connect() as c:
            row = c.execute(text("SELECT state, attempts, error FROM jobs ORDER BY id")).first()
    finally:
        engine.dispose()
    return (row[0], row[1], row[2]) if row else None


def _wait_state(
    url: str, states: set[str], timeout: float, procs: Procs, poll: float = 0.5
) -> tuple[str, int, str | None]:
    deadline = time.monotonic() + timeout
    job = None
    while time.monotonic() < deadline:
        job = _job(url)
        if job and job[0] in states:
            return job
        time.sleep(poll)
    raise AssertionError(f"job {job} never reached {states}\n{procs.logs()}")


def test_cine_through_scp_and_redis_worker_into_postgres(
    prod_env: dict[str, str], procs: Procs, tmp_path: Path
) -> None:
    url = prod_env["LUSAI_DATABASE_URL"]
    procs.start("scp", ["scp"], prod_env)
    procs.start("worker", ["worker"], prod_env)
    cine = phantom_cine_file(tmp_path / "cine.dcm", frames=12, jpeg=True)
    _send(prod_env, cine)
    state, attempts, error = _wait_state(url, {"succeeded", "failed"}, 240, procs)
    assert (state, attempts, error) == ("succeeded", 1, None), procs.logs()

    engine = create_engine(url)
    with engine.connect() as c:
        inst = c.execute(
            text(
                "SELECT sop_instance_uid, frames, calling_ae, storage_key, sha256, state, "
                "transfer_syntax_uid FROM instances"
            )
        ).one()
        study = c.execute(text("SELECT patient_id, accession_number, study_date FROM studies")).one()
        job = c.execute(text("SELECT model_version, timings_ms, started_at, finished_at FROM jobs")).one()
        res = c.execute(
            text(
                "SELECT score, frame_scores, model_name, weights_sha256, seg_sop_instance_uid, "
                "sr_sop_instance_uid, seg_storage_key FROM results"
            )
        ).one()
    engine.dispose()
    import hashlib

    import pydicom

    src = pydicom.dcmread(cine)
    assert inst[0] == src.SOPInstanceUID and inst[1] == 12 and inst[2] == "SCANNER"
    assert inst[5] == "accepted" and inst[6] == "1.2.840.10008.1.2.4.50"
    stored = Path(prod_env["LUSAI_DATA_DIR"]) / "storage" / inst[3]
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == inst[4]
    # Stored as received: the SCP rewrites only the file meta header, never the dataset.
    kept = pydicom.dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert kept.PixelData == src.PixelData
    assert study == ("PHANTOM-1", "ACC1", "20260101")
    assert job[0] and job[2] <= job[3] and {"decode", "infer"} <= set(job[1])
    assert res[0] in (0, 1, 2, 3) and len(res[1]) == 12 and res[2] and len(res[3]) == 64
    assert res[4] and res[5]
    seg = pydicom.dcmread(Path(prod_env["LUSAI_DATA_DIR"]) / "storage" / res[6])
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == src.StudyInstanceUID


def test_worker_killed_mid_job_is_recovered(prod_env: dict[str, str], procs: Procs, tmp_path: Path) -> None:
    url = prod_env["LUSAI_DATABASE_URL"]
    # In production stale_job_after exceeds the task time limit; here it is short to keep the test quick.
    env = prod_env | {"LUSAI_STALE_JOB_AFTER": "20", "LUSAI_RECOVERY_INTERVAL": "2"}
    procs.start("scp", ["scp"], env)
    worker = procs.start("worker1", ["worker"], env)
    cine = phantom_cine_file(tmp_path / "cine.dcm", frames=40, jpeg=False)
    _send(env, cine)
    _wait_state(url, {"running"}, 120, procs, poll=0.05)
    os.killpg(worker.pid, signal.SIGKILL)  # the whole worker: main process and pool child
    worker.wait(timeout=10)
    assert _job(url)[0] == "running"  # type: ignore[index]
    procs.start("worker2", ["worker"], env)
    state, attempts, _ = _wait_state(url, {"succeeded", "failed"}, 240, procs)
    assert state == "succeeded" and attempts >= 2, procs.logs()
