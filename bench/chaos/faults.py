"""Faults mid-stream on a production deployment: every cine stored once, analysed once, delivered once.

One throw-away deployment per fault: PostgreSQL database ``lusai_chaos_*``, a Redis DB index of
its own (11-15, claimed with the same lock key as the tests' ``redis_url`` fixture), ``lusai scp``
and ``lusai worker`` processes (``tests.test_production.Procs``) and a DCMTK storescp as the
destination PACS. A burst of small phantom cines (PHI markers in their headers) is sent with
pynetdicom; each fault hits while the burst is stored or analysed; then the books are checked:

* every cine answered Success has exactly one ``instances`` row, exactly one succeeded job and one
  result, and each of its outputs (SEG, SR, overlay SC) arrived at the storescp exactly once
  (files counted by SOP Instance UID); no half object is indexed, no temp file is left behind;
* recovery time: from the fault to the moment everything is delivered.

Faults (``--faults``, in this order): ``scp_kill`` (kill -9 of the SCP during the C-STORE of a
large cine), ``worker_kill`` (kill -9 of the whole worker during inference), ``redis_restart``,
``pg_restart`` (these two restart the machine's shared servers: other users see a blip),
``disk_full`` (storage on a 20 MiB tmpfs, needs root), ``disk_full_worker`` (the same tmpfs
filled before the worker writes its outputs), ``pacs_down`` (the destination down for an
hour of simulated time: deliveries' ``next_attempt_at`` is moved back, the recovery sweep resends
them), ``clock_jump`` (the worker under ``faketime`` +2 h, then -2 h).

    .venv/bin/python bench/chaos/faults.py --quick --out /tmp/faults.json
    .venv/bin/python bench/chaos/faults.py --out /tmp/faults.json       # full: 24 cines per fault

Exit status 1 when any fault lost or duplicated anything, or did not catch up in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import pydicom  # noqa: E402
import redis  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from tests.conftest import PG_ADMIN_URL, REDIS_URL, free_port  # noqa: E402
from tests.test_production import Procs  # noqa: E402

PHI_NAME = "CHAOS^PHI^MARKER"
PG_VERSION = "15"
REDIS_START = [
    "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379", "--save", "",
    "--appendonly", "no", "--dir", "/var/lib/redis", "--logfile", "/var/log/redis/ci.log",
]  # fmt: skip


# --- the objects -----------------------------------------------------------------------------------


class Cines:
    """Phantom cines: one rendered template per size, copied with new UIDs and PHI markers."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.templates: dict[int, pydicom.Dataset] = {}
        self.n = 0

    def make(self, study_uid: str, frames: int = 8) -> Path:
        from tests.factories import phantom_cine_file

        if frames not in self.templates:
            p = phantom_cine_file(self.folder / f"template-{frames}.dcm", frames=frames)
            self.templates[frames] = pydicom.dcmread(p)
        ds = self.templates[frames].copy()
        self.n += 1
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.StudyInstanceUID = study_uid
        ds.PatientName = PHI_NAME
        ds.PatientID = f"PHI-{study_uid[-6:]}"
        ds.AccessionNumber = f"PHIACC{self.n:06d}"
        ds.InstanceNumber = self.n
        path = self.folder / f"cine-{self.n:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    def burst(self, n: int, studies: int = 3, frames: int = 8) -> list[Path]:
        uids = [generate_uid() for _ in range(studies)]
        return [self.make(uids[i % studies], frames) for i in range(n)]


def c_store(port: int, path: Path, timeout: float = 60, host: str = "127.0.0.1") -> int:
    """One association, one C-STORE of ``path``; the status, or -1 when none came back."""
    from pynetdicom import AE
    from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title="SCANNER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate(host, port, ae_title="LUSAI")
    if not assoc.is_established:
        return -1
    try:
        status = assoc.send_c_store(path)
        return int(status.Status) if "Status" in status else -1
    except Exception:
        return -1
    finally:
        if assoc.is_established:
            assoc.release()


# --- the deployment --------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A throw-away production deployment; ``close()`` removes the database and the Redis keys."""

    work: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    db_name: str = field(default_factory=lambda: f"lusai_chaos_{uuid.uuid4().hex[:10]}")
    pacs: subprocess.Popen[bytes] | None = None

    def __post_init__(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        self.admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        self.db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.db_name}"
        self.engine = create_engine(self.db_url, pool_pre_ping=True)
        self.redis_db = self._claim_redis()
        self.pacs_port = free_port()
        self.pacs_dir = self.work / "pacs"
        self.start_pacs()
        self.env = (
            {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
            | {
                "LUSAI_DATA_DIR": str(self.work / "data"),
                "LUSAI_DATABASE_URL": self.db_url,
                "LUSAI_BROKER_URL": f"{REDIS_URL}/{self.redis_db}",
                "LUSAI_DICOM_PORT": str(free_port()),
                "LUSAI_ALLOWED_CALLING_AES": "SCANNER",
                "LUSAI_LOG_FORMAT": "json",
                "LUSAI_DEFAULT_DESTINATION": f"PACS@127.0.0.1:{self.pacs_port}",
                "LUSAI_RECOVERY_INTERVAL": "2",
                "LUSAI_STALE_JOB_AFTER": "30",
            }
            | self.extra_env
        )
        subprocess.run(
            [sys.executable, "-m", "service", "db", "upgrade"], env=self.env, check=True, timeout=120,
            capture_output=True,
        )  # fmt: skip
        self.procs = Procs(self.work)
        self.port = int(self.env["LUSAI_DICOM_PORT"])

    def _claim_redis(self) -> int:
        for db in range(11, 16):
            client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
            if client.set("lusai-test-lock", "chaos", nx=True, ex=3600):
                for key in client.scan_iter():
                    if key != b"lusai-test-lock":
                        client.delete(key)
                return db
        raise RuntimeError("no free Redis DB index in 11-15")

    def start_pacs(self) -> None:
        self.pacs_dir.mkdir(parents=True, exist_ok=True)
        storescp = shutil.which("storescp")
        assert storescp, "DCMTK storescp is needed"
        self.pacs = subprocess.Popen(
            [storescp, "-aet", "PACS", "+xa", "-uf", "-od", str(self.pacs_dir), str(self.pacs_port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)

    def stop_pacs(self) -> None:
        if self.pacs and self.pacs.poll() is None:
            self.pacs.terminate()
            self.pacs.wait(timeout=10)

    def start(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.procs.start(name, args, env or self.env)

    def wait_scp(self, timeout: float = 60) -> None:
        import socket

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.2)
        raise RuntimeError("SCP did not start\n" + self.procs.logs())

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as c:
            return list(c.execute(text(sql), params).all())

    def close(self) -> None:
        self.procs.stop_all()
        self.stop_pacs()
        self.engine.dispose()
        with contextlib.suppress(Exception), self.admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()
        with contextlib.suppress(Exception):
            redis.Redis.from_url(f"{REDIS_URL}/{self.redis_db}").flushdb()


def wait_redis(timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if redis.Redis.from_url(REDIS_URL).ping():
                return
        time.sleep(0.2)
    raise RuntimeError("Redis did not come back")


# --- the books -------------------------------------------------------------------------------------


def pacs_counts(folder: Path) -> Counter[str]:
    """How many times each SOP Instance UID arrived at the storescp."""
    out: Counter[str] = Counter()
    for f in folder.iterdir() if folder.is_dir() else []:
        with contextlib.suppress(Exception):
            out[str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)] += 1
    return out


def books(dep: Deployment, accepted: list[str]) -> dict[str, Any]:
    """Lost and duplicated objects for the SOP Instance UIDs the SCP answered Success to."""
    inst = Counter(
        r[0]
        for r in dep.rows(
            "SELECT sop_instance_uid FROM instances WHERE sop_instance_uid = ANY(:u)", u=accepted
        )
    )
    ok_jobs = Counter(
        r[0]
        for r in dep.rows(
            "SELECT i.sop_instance_uid FROM jobs j JOIN instances i ON i.id = j.instance_id "
            "WHERE j.state = 'succeeded' AND i.sop_instance_uid = ANY(:u)",
            u=accepted,
        )
    )
    results = Counter(
        r[0]
        for r in dep.rows(
            "SELECT i.sop_instance_uid FROM results r JOIN jobs j ON j.id = r.job_id "
            "JOIN instances i ON i.id = j.instance_id WHERE i.sop_instance_uid = ANY(:u)",
            u=accepted,
        )
    )
    outputs = dep.rows(
        "SELECT d.sop_instance_uid, d.state, i.sop_instance_uid FROM deliveries d "
        "JOIN results r ON r.id = d.result_id JOIN jobs j ON j.id = r.job_id "
        "JOIN instances i ON i.id = j.instance_id WHERE i.sop_instance_uid = ANY(:u)",
        u=accepted,
    )
    arrived = pacs_counts(dep.pacs_dir)
    per_source: dict[str, list[str]] = {}
    for out_uid, _state, src in outputs:
        per_source.setdefault(src, []).append(out_uid)
    lost = [
        u
        for u in accepted
        if inst[u] == 0 or ok_jobs[u] == 0 or results[u] == 0 or len(per_source.get(u, [])) < 2
    ]
    lost_outputs = [o for o, _s, _src in outputs if arrived[o] == 0]
    dup = [u for u in accepted if inst[u] > 1 or ok_jobs[u] > 1 or results[u] > 1]
    dup_outputs = [o for o, _s, _src in outputs if arrived[o] > 1]
    tmp = dep.work / "data" / "storage" / "tmp"
    return {
        "accepted": len(accepted),
        "lost_objects": len(lost) + len(lost_outputs),
        "duplicate_results": len(dup) + len(dup_outputs),
        "outputs": len(outputs),
        "outputs_arrived": sum(1 for o, _s, _src in outputs if arrived[o]),
        "dead_deliveries": sum(1 for _o, s, _src in outputs if s == "dead"),
        "indexed_not_accepted": dep.rows(
            "SELECT count(*) FROM instances WHERE NOT (sop_instance_uid = ANY(:u))", u=accepted
        )[0][0],
        "temp_files": len(list(tmp.iterdir())) if tmp.is_dir() else 0,
        "failed_jobs": dep.rows("SELECT count(*) FROM jobs WHERE state = 'failed'")[0][0],
    }


def caught_up(dep: Deployment, accepted: list[str], timeout: float) -> float | None:
    """Wait until every accepted cine is analysed and every output delivered; seconds waited or None."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with contextlib.suppress(Exception):
            b = books(dep, accepted)
            if b["lost_objects"] == 0 and b["outputs"] >= 2 * len(accepted):
                return time.monotonic() - t0
        time.sleep(1)
    return None


def send_burst(dep: Deployment, paths: list[Path], threads: int = 2, retries: int = 0) -> dict[str, int]:
    """C-STORE each path (re-sending a failure ``retries`` times); SOP Instance UID -> last status."""

    def one(p: Path) -> tuple[str, int]:
        uid = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        status = c_store(dep.port, p)
        for _ in range(retries):
            if status == 0:
                break
            time.sleep(1)
            status = c_store(dep.port, p)
        return uid, status

    with ThreadPoolExecutor(threads) as pool:
        return dict(pool.map(one, paths))


def job_states(dep: Deployment) -> Counter[str]:
    return Counter(r[0] for r in dep.rows("SELECT state FROM jobs"))


def wait_until(cond: Callable[[], bool], timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if cond():
                return True
        time.sleep(poll)
    return False


# --- the faults ------------------------------------------------------------------------------------


@dataclass
class Run:
    n: int
    work: Path
    cines: Cines
    timeout: float


def fault_scp_kill(run: Run) -> dict[str, Any]:
    """kill -9 of the SCP while a large cine is being received; re-send after a restart."""
    dep = Deployment(run.work / "scp_kill")
    try:
        scp = dep.start("scp", ["scp"])
        dep.start("worker", ["worker"])
        dep.wait_scp()
        study = generate_uid()
        big = dep.work / "big.dcm"
        from tests.factories import cine

        ds = cine("raw", frames=200, rows=480, cols=640, seed=1, PatientName=PHI_NAME, PatientID="PHI-BIG")
        ds.StudyInstanceUID = study
        ds.save_as(big, enforce_file_format=True)  # about 60 MB: several seconds on the wire
        small = [run.cines.make(study) for _ in range(run.n - 1)]
        tmp = dep.work / "data" / "storage" / "tmp"
        statuses: dict[str, int] = {}
        sender = threading.Thread(
            target=lambda: statuses.update(send_burst(dep, [big], threads=1))
        )  # fmt: skip
        sender.start()
        if not wait_until(
            lambda: any(tmp.glob("*.part")) and sum(f.stat().st_size for f in tmp.iterdir()) > 5e6, 60
        ):
            raise RuntimeError("the large C-STORE never started\n" + dep.procs.logs())
        os.killpg(scp.pid, signal.SIGKILL)
        t_fault = time.monotonic()
        scp.wait(timeout=10)
        sender.join(timeout=120)
        first_status = next(iter(statuses.values()))
        half = dep.rows("SELECT count(*) FROM instances")[0][0]
        leftovers = [f for f in tmp.iterdir()]
        dep.start("scp2", ["scp"])
        dep.wait_scp()
        # The abandoned temp file: the sweep removes it once it is older than its limit (an hour
        # at least); simulate that hour by ageing the file, then wait for a sweep.
        for f in leftovers:
            with contextlib.suppress(FileNotFoundError):
                os.utime(f, (time.time() - 7200, time.time() - 7200))
        statuses = send_burst(dep, [big, *small], retries=3)
        accepted = [u for u, s in statuses.items() if s == 0]
        recovery = caught_up(dep, accepted, run.timeout)
        wait_until(lambda: not any(f.exists() for f in leftovers), 10, poll=0.5)
        out = books(dep, accepted)
        out |= {
            "first_status": first_status,
            "indexed_after_kill": half,
            "temp_files_after_kill": len(leftovers),
            "temp_files_left": sum(1 for f in leftovers if f.exists()),
            "sent": len(statuses),
            "recovery_s": None if recovery is None else round(time.monotonic() - t_fault, 1),
            "what": "kill -9 of the SCP process group mid C-STORE of a 60 MB cine; restart; re-send",
        }
        out["ok"] = (
            first_status != 0 and half == 0 and out["temp_files_left"] == 0 and recovery is not None
            and len(accepted) == len(statuses)
        )  # fmt: skip
        return out
    finally:
        dep.close()


def fault_worker_kill(run: Run) -> dict[str, Any]:
    """kill -9 of the whole worker (main process and pool) while it analyses; a new worker finishes."""
    dep = Deployment(run.work / "worker_kill", {"LUSAI_STALE_JOB_AFTER": "20"})
    try:
        dep.start("scp", ["scp"])
        worker = dep.start("worker1", ["worker"])
        dep.wait_scp()
        statuses = send_burst(dep, run.cines.burst(run.n))
        accepted = [u for u, s in statuses.items() if s == 0]
        if not wait_until(lambda: job_states(dep)["running"] > 0, 240):
            raise RuntimeError("no job ever ran\n" + dep.procs.logs())
        os.killpg(worker.pid, signal.SIGKILL)
        t_fault = time.monotonic()
        worker.wait(timeout=10)
        dep.start("worker2", ["worker"])
        recovery = caught_up(dep, accepted, run.timeout)
        out = books(dep, accepted) | {
            "sent": len(statuses),
            "recovery_s": None if recovery is None else round(time.monotonic() - t_fault, 1),
            "what": "kill -9 of the worker's process group during inference; a new worker started",
        }
        out["ok"] = recovery is not None
        return out
    finally:
        dep.close()


def fault_redis_restart(run: Run) -> dict[str, Any]:
    """Redis shut down (nothing saved) mid-burst and started again: the queue is empty afterwards."""
    # Default settings: the recovery sweep sees Redis's new run_id and sends again what went before
    # the restart (recovery.BrokerRestarts), instead of waiting max(60 s, LUSAI_TASK_TIME_LIMIT).
    dep = Deployment(run.work / "redis_restart")
    try:
        dep.start("scp", ["scp"])
        dep.start("worker", ["worker"])
        dep.wait_scp()
        paths = run.cines.burst(run.n)
        half = len(paths) // 2
        statuses = send_burst(dep, paths[:half])
        subprocess.run(["redis-cli", "-p", "6379", "shutdown", "nosave"], capture_output=True, timeout=30)
        t_fault = time.monotonic()
        statuses |= send_burst(dep, paths[half:])  # stored while the broker is gone
        time.sleep(3)
        subprocess.run(REDIS_START, check=True, timeout=30)
        wait_redis()
        redis.Redis.from_url(f"{REDIS_URL}/{dep.redis_db}").set("lusai-test-lock", "chaos", ex=3600)
        accepted = [u for u, s in statuses.items() if s == 0]
        recovery = caught_up(dep, accepted, run.timeout)
        out = books(dep, accepted) | {
            "sent": len(statuses),
            "recovery_s": None if recovery is None else round(time.monotonic() - t_fault, 1),
            "what": "redis-cli shutdown nosave mid-burst, half the burst sent while down, redis-server "
            "started",
        }
        out["ok"] = recovery is not None
        return out
    finally:
        dep.close()


def fault_pg_restart(run: Run) -> dict[str, Any]:
    """PostgreSQL restarted mid-burst: the SCP spools, the worker retries, all catches up."""
    dep = Deployment(run.work / "pg_restart")
    try:
        dep.start("scp", ["scp"])
        dep.start("worker", ["worker"])
        dep.wait_scp()
        paths = run.cines.burst(run.n)
        results: dict[str, int] = {}
        sender = threading.Thread(target=lambda: results.update(send_burst(dep, paths, threads=2)))
        sender.start()
        wait_until(lambda: dep.rows("SELECT count(*) FROM instances")[0][0] >= len(paths) // 4, 120, poll=0.2)
        t_fault = time.monotonic()
        subprocess.run(
            ["pg_ctlcluster", "--skip-systemctl-redirect", PG_VERSION, "main", "restart"],
            check=True,
            timeout=120,
        )
        sender.join(timeout=600)
        accepted = [u for u, s in results.items() if s == 0]
        recovery = caught_up(dep, accepted, run.timeout)
        out = books(dep, accepted) | {
            "sent": len(results),
            "statuses": dict(Counter(f"0x{s & 0xFFFF:04X}" if s >= 0 else "none" for s in results.values())),
            "recovery_s": None if recovery is None else round(time.monotonic() - t_fault, 1),
            "what": "pg_ctlcluster 15 main restart mid-burst",
        }
        out["ok"] = recovery is not None
        return out
    finally:
        dep.close()


#: Cines in the disk-full burst whatever ``--cines`` says: what fits the 20 MiB tmpfs once freed.
DISK_FULL_CINES = 8


def fault_disk_full(run: Run) -> dict[str, Any]:
    """Storage on a 20 MiB tmpfs: the SCP answers 0xA700, keeps nothing half, and takes the re-send."""
    mount = run.work / "disk_full_storage"
    mount.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        return {"ok": None, "skipped": "cannot mount a tmpfs (not root?)"}
    dep = None
    try:
        dep = Deployment(run.work / "disk_full", {"LUSAI_STORAGE_ROOT": str(mount)})
        dep.start("scp", ["scp"])
        dep.wait_scp()
        filler = mount / "filler"
        # 20 MiB holds about 8 cines and their outputs: the point is the full disk, not the burst
        paths = run.cines.burst(min(run.n, DISK_FULL_CINES))
        size = paths[0].stat().st_size
        free = shutil.disk_usage(mount).free
        # leave room for about half the burst (the worker's outputs go there too: not started yet)
        with open(filler, "wb") as f:
            f.write(b"\0" * max(0, free - size * (len(paths) // 2) - size // 2))
        statuses = send_burst(dep, paths, threads=1)
        refused = [u for u, s in statuses.items() if s != 0]
        codes = Counter(f"0x{s & 0xFFFF:04X}" if s >= 0 else "none" for s in statuses.values())
        half_indexed = dep.rows("SELECT count(*) FROM instances WHERE sop_instance_uid = ANY(:u)", u=refused)[
            0
        ][0]
        tmp_after = len(list((mount / "tmp").iterdir()))
        filler.unlink()
        t_fault = time.monotonic()
        dep.start("worker", ["worker"])
        statuses |= send_burst(
            dep,
            [p for p in paths if str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) in refused],
        )
        accepted = [u for u, s in statuses.items() if s == 0]
        recovery = caught_up(dep, accepted, run.timeout)
        out = books(dep, accepted) | {
            "sent": len(paths),
            "refused_when_full": len(refused),
            "statuses_when_full": dict(codes),
            "refused_indexed": half_indexed,
            "temp_files_when_full": tmp_after,
            "recovery_s": None if recovery is None else round(time.monotonic() - t_fault, 1),
            "what": "storage on a 20 MiB tmpfs filled up mid-burst; space freed; refused cines re-sent",
        }
        out["ok"] = (
            recovery is not None and len(refused) > 0 and set(codes) <= {"0x0000", "0xA700"}
            and half_indexed == 0 and tmp_after == 0 and len(accepted) == len(paths)
        )  # fmt: skip
        return out
    finally:
        if dep is not None:
            dep.close()
        subprocess.run(["umount", str(mount)], capture_output=True)


@contextlib.contextmanager
def _tmpfs(mount: Path, size: str = "20m") -> Iterator[bool]:
    """A small tmpfs at ``mount`` (True), or False when it cannot be mounted (not root)."""
    mount.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True
    )
    try:
        yield mounted.returncode == 0
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", str(mount)], capture_output=True)


def _fill(mount: Path, leave: int) -> Path:
    """Fill the file system of ``mount`` but for ``leave`` bytes; the filler's path."""
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, shutil.disk_usage(mount).free - leave))
    return filler


def fault_disk_full_worker(run: Run) -> dict[str, Any]:
    """Storage full while the worker writes its outputs: every job waits (no attempt spent, none
    FAILED with ``LUSAI_JOB_MAX_ATTEMPTS=1``), and all are analysed once space is freed."""
    with _tmpfs(run.work / "disk_full_worker_storage") as mounted:
        if not mounted:
            return {"ok": None, "skipped": "cannot mount a tmpfs (not root?)"}
        mount = run.work / "disk_full_worker_storage"
        dep = Deployment(
            run.work / "disk_full_worker", {"LUSAI_STORAGE_ROOT": str(mount), "LUSAI_JOB_MAX_ATTEMPTS": "1"}
        )
        try:
            dep.start("scp", ["scp"])
            dep.wait_scp()
            paths = run.cines.burst(min(run.n, DISK_FULL_CINES))
            statuses = send_burst(dep, paths, threads=1)  # the sources fit; the worker is not up yet
            accepted = [u for u, s in statuses.items() if s == 0]
            filler = _fill(mount, leave=64 << 10)
            dep.start("worker", ["worker"])
            waited = wait_until(
                lambda: (
                    dep.rows("SELECT count(*) FROM jobs WHERE error LIKE 'storage full%'")[0][0]
                    >= len(accepted)
                ),
                run.timeout,
                1,
            )
            time.sleep(45)  # a second round of tries on the full disk (the first countdown is 30 s)
            states_while_full = dict(Counter(r[0] for r in dep.rows("SELECT state FROM jobs")))
            filler.unlink()
            t_free = time.monotonic()
            recovery = caught_up(dep, accepted, run.timeout)
            out = books(dep, accepted) | {
                "sent": len(paths),
                "jobs_waited_for_space": waited,
                "job_states_while_full": states_while_full,
                "max_attempts_after": dep.rows("SELECT max(attempts) FROM jobs")[0][0],
                "recovery_s": None if recovery is None else round(time.monotonic() - t_free, 1),
                "what": "sources stored, then the storage filled before the worker wrote any output; "
                "LUSAI_JOB_MAX_ATTEMPTS=1; space freed after two rounds of tries",
            }
            out["ok"] = (
                recovery is not None and waited and "failed" not in states_while_full
                and len(accepted) == len(paths)
            )  # fmt: skip
            return out
        finally:
            dep.close()


#: A retrying delivery's next try made due now, far enough back that the recovery sweep resends it.
DUE_NOW = "UPDATE deliveries SET next_attempt_at = now() - interval '1 hour' WHERE state = 'retrying'"


def fault_pacs_down(run: Run) -> dict[str, Any]:
    """The destination down for an hour of simulated time, then back: all outputs arrive, in order."""
    from service.core.lifecycle import DELIVERY_BACKOFF

    dep = Deployment(run.work / "pacs_down")
    try:
        dep.stop_pacs()
        dep.start("scp", ["scp"])
        dep.start("worker", ["worker"])
        dep.wait_scp()
        statuses = send_burst(dep, run.cines.burst(run.n))
        accepted = [u for u, s in statuses.items() if s == 0]
        t0 = time.monotonic()
        outputs = 2 * len(accepted)
        if not wait_until(
            lambda: (
                dep.rows("SELECT count(*) FROM deliveries WHERE state IN ('retrying', 'waiting')")[0][0]
                >= outputs
            ),
            run.timeout,
            1,
        ):
            raise RuntimeError("deliveries never failed\n" + dep.procs.logs())
        # Simulated clock: a delivery that has failed a attempts has waited the sum of the first
        # a-1 backoffs since its first try. Make each retry due at once (next_attempt_at far in the
        # past: the recovery sweep resends it) until every delivery has seen an hour of outage.
        hour = 3600.0

        def simulated(attempts: int) -> float:
            return sum(DELIVERY_BACKOFF.delay(a) for a in range(1, attempts))

        rounds = 0
        while True:
            rows = dep.rows("SELECT id, state, attempts FROM deliveries")
            if any(s == "dead" for _i, s, _a in rows):
                break
            behind = [i for i, s, a in rows if s == "retrying" and simulated(a + 1) <= hour]
            if not behind and all(s in ("retrying", "waiting") for _i, s, _a in rows):
                break
            if behind:
                with dep.engine.begin() as c:
                    c.execute(text(DUE_NOW + " AND id = ANY(:i)"), {"i": behind})
                rounds += 1
            time.sleep(2)
            if time.monotonic() - t0 > run.timeout * 3:
                raise RuntimeError("simulated hour did not pass")
        dead_during_outage = dep.rows("SELECT count(*) FROM deliveries WHERE state = 'dead'")[0][0]
        attempts_during_outage = dep.rows("SELECT max(attempts) FROM deliveries")[0][0]
        dep.start_pacs()
        t_fault = time.monotonic()
        # The PACS is back. Nothing is made due: the worker's recovery sweep (every 2 s here)
        # C-ECHOes the destination, finds it back and wakes its retries; each delivery then
        # releases the next output of its study. (By the backoff alone the first retry would come
        # first_retry_due_after_return_s later.)
        first_due_s, last_due_s = dep.rows(
            "SELECT coalesce(min(extract(epoch FROM next_attempt_at - now())), 0), "
            "coalesce(max(extract(epoch FROM next_attempt_at - now())), 0) FROM deliveries "
            "WHERE state = 'retrying'"
        )[0]
        recovery = caught_up(dep, accepted, run.timeout)
        out = books(dep, accepted)
        # Order per study: each study's outputs arrive in the order their results were made.
        order = dep.rows(
            "SELECT s.study_instance_uid, d.delivered_at, r.id FROM deliveries d "
            "JOIN results r ON r.id = d.result_id JOIN jobs j ON j.id = r.job_id "
            "JOIN instances i ON i.id = j.instance_id JOIN series se ON se.id = i.series_id "
            "JOIN studies s ON s.id = se.study_id WHERE d.delivered_at IS NOT NULL ORDER BY d.delivered_at"
        )
        out_of_order = 0
        last: dict[str, int] = {}
        for study, _at, rid in order:
            if rid < last.get(study, 0):
                out_of_order += 1
            last[study] = max(rid, last.get(study, 0))
        out |= {
            "sent": len(statuses),
            "simulated_outage_s": hour,
            "retry_rounds": rounds,
            "max_attempts_during_outage": attempts_during_outage,
            "dead_during_outage": dead_during_outage,
            "out_of_order_per_study": out_of_order,
            "recovery_s": None if recovery is None else round(time.monotonic() - t_fault, 1),
            "first_retry_due_after_return_s": round(float(first_due_s)),
            "last_retry_due_after_return_s": round(float(last_due_s)),
            "what": "storescp stopped; deliveries retried through an hour of simulated backoff; "
            "storescp started, nothing made due (the sweep's C-ECHO probe finds it)",
        }
        out["ok"] = recovery is not None and dead_during_outage == 0 and out_of_order == 0
        return out
    finally:
        dep.close()


def fault_clock_jump(run: Run) -> dict[str, Any]:
    """The worker's clock jumps +2 h, then -2 h (faketime): no job declared stale twice, no duplicate."""
    faketime = _libfaketime()
    if faketime is None:
        return {"ok": None, "skipped": "faketime not installed (apt-get install faketime)"}
    dep = Deployment(run.work / "clock_jump", {"LUSAI_STALE_JOB_AFTER": "60"})
    try:
        dep.start("scp", ["scp"])
        dep.wait_scp()
        paths = run.cines.burst(run.n)
        half = len(paths) // 2
        statuses = send_burst(dep, paths[:half])
        t_fault = time.monotonic()
        plus = _faketime_worker(dep, faketime, "+2h", dep.env)
        statuses |= send_burst(dep, paths[half:])
        accepted = [u for u, s in statuses.items() if s == 0]
        wait_until(lambda: job_states(dep)["succeeded"] >= len(accepted) // 2, run.timeout, 1)
        os.kill(plus.pid, signal.SIGTERM)  # warm shutdown: the job in hand finishes
        plus.wait(timeout=120)
        minus = _faketime_worker(dep, faketime, "-2h", dep.env)
        recovery = caught_up(dep, accepted, run.timeout)
        attempts = dep.rows("SELECT max(attempts) FROM jobs")[0][0]
        os.killpg(minus.pid, signal.SIGTERM)
        out = books(dep, accepted) | {
            "sent": len(statuses),
            "max_job_attempts": attempts,
            "recovery_s": None if recovery is None else round(time.monotonic() - t_fault, 1),
            "what": "worker under faketime +2h, then another under -2h, mid-burst",
        }
        out["ok"] = recovery is not None and attempts == 1
        return out
    finally:
        dep.close()


def _faketime_worker(dep: Deployment, lib: str, offset: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A worker whose clock is ``offset`` off: libfaketime preloaded (the ``faketime`` wrapper would
    run it as a child, and a signal to the wrapper would not reach it), inherited by its Celery child."""
    return dep.start(f"worker{offset}", ["worker"], env | {"LD_PRELOAD": lib, "FAKETIME": offset})


def _libfaketime() -> str | None:
    for d in (
        "/usr/lib/x86_64-linux-gnu/faketime",
        "/usr/lib/aarch64-linux-gnu/faketime",
        "/usr/lib/faketime",
    ):
        if Path(d, "libfaketime.so.1").exists():
            return str(Path(d, "libfaketime.so.1"))
    return None


FAULTS: dict[str, Callable[[Run], dict[str, Any]]] = {
    "scp_kill": fault_scp_kill,
    "worker_kill": fault_worker_kill,
    "redis_restart": fault_redis_restart,
    "pg_restart": fault_pg_restart,
    "disk_full": fault_disk_full,
    "disk_full_worker": fault_disk_full_worker,
    "pacs_down": fault_pacs_down,
    "clock_jump": fault_clock_jump,
}
QUICK = ["scp_kill", "worker_kill", "pacs_down"]


def phi_lines(work: Path) -> int:
    """Log lines anywhere under ``work`` that carry a PHI marker."""
    n = 0
    for log in work.rglob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if PHI_NAME in line or "PHIACC" in line or "PHI-" in line:
                n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"6 cines per fault, only {', '.join(QUICK)}")
    ap.add_argument("--faults", default=None, help=f"comma-separated, from {', '.join(FAULTS)}")
    ap.add_argument("--cines", type=int, default=None, help="cines per burst (quick 6, full 24)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to catch up after each fault")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a new temp folder)")
    ap.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    args = ap.parse_args(argv)
    names = args.faults.split(",") if args.faults else (QUICK if args.quick else list(FAULTS))
    n = args.cines or (6 if args.quick else 24)
    import tempfile

    work = args.work or Path(tempfile.mkdtemp(prefix="lusai-faults-"))
    cines_dir = work / "cines"
    cines_dir.mkdir(parents=True, exist_ok=True)
    run = Run(n=n, work=work, cines=Cines(cines_dir), timeout=args.timeout)
    report: dict[str, Any] = {"started": datetime.now(UTC).isoformat(), "cines_per_fault": n, "faults": {}}
    for name in names:
        t = time.monotonic()
        try:
            report["faults"][name] = FAULTS[name](run)
        except Exception as exc:
            report["faults"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000]}
        report["faults"][name]["wall_s"] = round(time.monotonic() - t, 1)
        print(name, json.dumps(report["faults"][name]), flush=True)
    report["phi_log_lines"] = phi_lines(work)
    ran = [f for f in report["faults"].values() if f.get("ok") is not None]
    report["ok"] = report["phi_log_lines"] == 0 and all(
        f["ok"] and f.get("lost_objects", 1) == 0 and f.get("duplicate_results", 1) == 0 for f in ran
    )
    text_out = json.dumps(report, indent=2)
    print(text_out)
    if args.out:
        args.out.write_text(text_out)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
