"""Graceful shutdown and drain: SIGTERM to each lusai process while it is busy.

    .venv/bin/python bench/chaos/shutdown.py [--quick] [--out chaos-shutdown.json] [--only scp,worker,...]

Each case starts the process (production mode on PostgreSQL + Redis with the harness of
``bench/chaos/load.py``; ``lusai serve`` in embedded mode: SQLite and the filesystem broker), makes
it busy, sends SIGTERM to its main process only (what ``kill PID`` or a service manager's first
signal does) and records the time until it exited, the exit code, and every process of its tree
(snapshot taken just before the signal) still running afterwards (target: none).

- ``scp`` and ``scp-processes`` (``lusai scp --processes 3``, as the systemd unit runs it): 6
  associations streaming 5.9 MB objects (8 each); SIGTERM once each has stored one. Each C-STORE either got
  Success (then its Instance row exists with stored bytes of the right SHA-256 and one job) or a
  failure/abort (then no row); no stored object without a row once a restarted SCP's recovery
  sweep has run, a new association after the signal is refused, and the exit code is 0.
- ``worker`` (``LUSAI_SHUTDOWN_GRACE`` 60 s): SIGTERM while a job is running: Celery's warm
  shutdown finishes the job (succeeded, one result) before the process exits.
- ``worker-grace-expired`` (``LUSAI_SHUTDOWN_GRACE=1``): the job in hand is killed with its worker;
  a new worker takes it over (measured: seconds until it succeeded; exactly one result).
- ``api`` (``LUSAI_SHUTDOWN_GRACE=10``): an upload trickling in (3 MB at ~300 KB/s) and reads in
  flight; SIGTERM: the upload finishes (202, indexed) and the process exits.
- ``api-slow-client``: the same upload at ~55 KB/s (55 s): cut after the grace, the client sees
  the connection close, nothing indexed, no temporary file left; exit within grace + 5 s.
- ``serve`` (embedded, ``LUSAI_SHUTDOWN_GRACE=2``): an association in progress and a job in hand;
  SIGTERM; then ``lusai serve`` again: every stored object is analysed exactly once.

Exit code 1 when a process outlives its tree check, hangs (60 s), or an object or job is lost or
duplicated. ``--quick`` uses fewer and smaller objects.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.chaos.load import (  # noqa: E402
    CALLING_AE,
    PHI_NAME,
    Deployment,
    deployment,
    phi_hits,
    process_tree,
    wait_for_echo,
)

HANG_S = 60.0


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def terminate(proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """SIGTERM to the main process; time to exit, exit code, and what of its tree still runs."""
    tree = process_tree(proc.pid)
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=HANG_S)
    except subprocess.TimeoutExpired:
        code = None
    exit_s = round(time.monotonic() - t0, 2)
    time.sleep(0.5)  # a child that outlives its parent would still be here
    left = sorted(p for p in tree if alive(p))
    for p in left:  # never leave them behind us either
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
    if code is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return {
        "processes_in_tree": len(tree),
        "exit_code": code,
        "time_to_exit_s": exit_s,
        "hung": code is None,
        "left_running": left,
    }


def make_cine(path: Path, seed: int, frames: int, rows: int, cols: int, phantom: bool = False) -> Path:
    from pydicom.uid import generate_uid

    from tests.factories import cine, phantom_cine_file, save

    kw: dict[str, Any] = {
        "sop_uid": generate_uid(),
        "study_uid": generate_uid(),
        "PatientName": PHI_NAME,
        "PatientID": f"PHI-SHUT-{seed}",
        "AccessionNumber": f"PHIACC{seed}",
    }
    if phantom:
        return phantom_cine_file(path, frames=frames, seed=seed, **kw)
    ds = cine("raw", frames=frames, rows=rows, cols=cols, seed=seed, **kw)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return save(ds, path)


def rows(d: Deployment | Path, sql: str) -> list[Any]:
    from sqlalchemy import create_engine, text

    engine = d.engine() if isinstance(d, Deployment) else create_engine(f"sqlite:///{d}")
    try:
        with engine.connect() as c:
            return list(c.execute(text(sql)))
    finally:
        engine.dispose()


def integrity(db: Deployment | Path, storage: Path, successes: list[str]) -> dict[str, Any]:
    """Every Success indexed with its bytes; every row with its bytes and one job; no stored object
    without a row (half-indexed), no temporary files left."""
    inst = {
        r[0]: (r[1], r[2], r[3])
        for r in rows(
            db,
            "SELECT sop_instance_uid, storage_key, sha256, "
            "(SELECT count(*) FROM jobs j WHERE j.instance_id = i.id) FROM instances i",
        )
    }
    bad_rows = [
        uid
        for uid, (key, digest, _) in inst.items()
        if not (storage / key).is_file() or hashlib.sha256((storage / key).read_bytes()).hexdigest() != digest
    ]
    keys = {key for key, _, _ in inst.values()}
    outputs = "seg_storage_key, sr_storage_key, sc_storage_key, preview_png_key, preview_gif_key, "
    outputs += "preview_webp_key"
    keys |= {k for r in rows(db, f"SELECT {outputs} FROM results") for k in r if k}  # SEG, SR, previews
    objects = storage / "objects"
    stored = (
        {str(p.relative_to(storage)) for p in objects.rglob("*") if p.is_file()}
        if objects.is_dir()
        else set()
    )
    return {
        "successes": len(successes),
        "success_without_row": sum(1 for u in successes if u not in inst),
        "rows": len(inst),
        "rows_without_bytes": len(bad_rows),
        "rows_without_exactly_one_job": sum(1 for _, _, n in inst.values() if n != 1),
        "stored_without_row": len(stored - keys),
        "temp_files_left": len(list((storage / "tmp").glob("*"))) if (storage / "tmp").is_dir() else 0,
    }


# --- SCP ---------------------------------------------------------------------------------------


class Streamer(threading.Thread):
    """One association sending ``files`` over and over (fresh UIDs are not needed: each file is
    sent once) until told to stop or the association breaks."""

    def __init__(self, port: int, files: list[Path]) -> None:
        super().__init__(daemon=True)
        self.port, self.files = port, files
        self.results: list[tuple[str, str]] = []  # (sop uid, outcome)
        self.error: str | None = None

    def run(self) -> None:
        from pydicom.filereader import read_file_meta_info
        from pydicom.uid import ExplicitVRLittleEndian, UltrasoundMultiFrameImageStorage
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(UltrasoundMultiFrameImageStorage, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="LUSAI")
        if not assoc.is_established:
            self.error = "association not established"
            return
        for f in self.files:
            uid = str(read_file_meta_info(f).MediaStorageSOPInstanceUID)
            try:
                rsp = assoc.send_c_store(f)
                outcome = f"0x{int(rsp.Status):04X}" if "Status" in rsp else "no-response"
            except Exception as exc:  # the association went away under us
                outcome = f"error:{type(exc).__name__}"
            self.results.append((uid, outcome))
            if not assoc.is_established:
                break
        if assoc.is_established:
            assoc.release()


def association_after(port: int) -> str:
    from pynetdicom import AE

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context("1.2.840.10008.1.1")
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="LUSAI")
    except OSError as exc:
        return f"connection-refused:{type(exc).__name__}"
    if assoc.is_established:
        assoc.release()
        return "established"
    return "rejected" if assoc.is_rejected else "refused (no association)"


def case_scp(work: Path, quick: bool, processes: int = 1) -> dict[str, Any]:
    from pynetdicom import _config

    _config.STORE_SEND_CHUNKED_DATASET = True
    senders, per = (3, 4) if quick else (6, 8)
    files = [
        [make_cine(work / "scp-objects" / f"{s}-{i}.dcm", 100 * s + i, 40, 384, 384) for i in range(per)]
        for s in range(senders)
    ]
    args = ["scp", "--processes", str(processes)] if processes > 1 else ["scp"]
    with deployment(work / f"scp{processes}", LUSAI_RECOVERY_INTERVAL="2") as d:
        scp = d.start("scp", args)
        wait_for_echo(d.port, scp)
        streams = [Streamer(d.port, fs) for fs in files]
        for s in streams:
            s.start()
        deadline = time.monotonic() + 30  # SIGTERM once every association has stored something
        while sum(1 for s in streams if s.results) < senders and time.monotonic() < deadline:
            time.sleep(0.01)
        in_progress = sum(1 for s in streams if s.is_alive())
        after: list[str] = []
        probe = threading.Thread(target=lambda: (time.sleep(0.2), after.append(association_after(d.port))))
        probe.start()
        out = terminate(scp)
        probe.join()
        for s in streams:
            s.join(60)
        # A new SCP (its recovery sweep indexes anything spooled) before the books are checked.
        scp2 = d.start("scp2", ["scp"])
        wait_for_echo(d.port, scp2)
        time.sleep(5)
        outcomes = [o for s in streams for _, o in s.results]
        successes = [u for s in streams for u, o in s.results if o == "0x0000"]
        storage = Path(d.env["LUSAI_DATA_DIR"]) / "storage"
        books = integrity(d, storage, successes)
        d.procs.stop_all()
    out |= {
        "associations_in_progress_at_sigterm": in_progress,
        "c_store_outcomes": dict(Counter(outcomes)),
        "new_association_after_sigterm": after[0] if after else None,
        **books,
    }
    out["ok"] = (
        not out["hung"]
        and not out["left_running"]
        and out["exit_code"] == 0  # a clean stop to a service manager (it was 130)
        and books["success_without_row"] == 0
        and books["rows_without_bytes"] == 0
        and books["rows_without_exactly_one_job"] == 0
        and books["stored_without_row"] == 0
        and out["new_association_after_sigterm"] != "established"
    )
    return out


# --- worker ------------------------------------------------------------------------------------


def wait_job(d: Deployment | Path, states: set[str], timeout: float, poll: float = 0.1) -> str | None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # SQLite busy, or the table not there yet
            got = rows(d, "SELECT state FROM jobs ORDER BY id")
            state = got[-1][0] if got else None
            if state in states:
                return state
        time.sleep(poll)
    return state


def send_one(port: int, path: Path) -> str:
    from bench.chaos.security import store

    return store(port, path, CALLING_AE)


def case_worker(work: Path, quick: bool, grace: float) -> dict[str, Any]:
    name = "worker" if grace > 5 else "worker-grace-expired"
    # With a grace of 1 s the job must still be running when the grace runs out: a long cine,
    # whatever the size of the run (24 frames were analysed within the grace on a quiet machine).
    frames = 150 if grace <= 5 else (24 if quick else 48)
    cine = make_cine(work / f"{name}.dcm", 7, frames, 0, 0, phantom=True)
    with deployment(work / name, LUSAI_SHUTDOWN_GRACE=str(grace)) as d:
        scp = d.start("scp", ["scp"])
        worker = d.start("worker", ["worker"])
        wait_for_echo(d.port, scp)
        status = send_one(d.port, cine)
        running = wait_job(d, {"running"}, 180, poll=0.02)
        time.sleep(0.3)  # well inside the job
        out = terminate(worker)
        state_at_exit = wait_job(d, {"succeeded", "failed", "running", "queued"}, 5)
        out |= {"c_store": status, "job_state_at_sigterm": running, "job_state_at_exit": state_at_exit}
        if state_at_exit != "succeeded":  # the job in hand was cut: does a new worker take it over?
            t0 = time.monotonic()
            d.start("worker2", ["worker"])
            final = wait_job(d, {"succeeded", "failed"}, 300, poll=0.5)
            out["takeover_s"] = round(time.monotonic() - t0, 1)
            out["job_state_final"] = final
        jobs = rows(d, "SELECT state, attempts FROM jobs")
        results = rows(d, "SELECT count(*) FROM results")[0][0]
        d.procs.stop_all()
    out |= {"jobs": [tuple(j) for j in jobs], "results": results}
    out["ok"] = (
        not out["hung"]
        and not out["left_running"]
        and len(jobs) == 1
        and jobs[0][0] == "succeeded"
        and results == 1
        and (grace <= 5 or state_at_exit == "succeeded")
    )
    return out


# --- API ---------------------------------------------------------------------------------------


def case_api(work: Path, quick: bool, pause: float = 0.1) -> dict[str, Any]:
    import http.client

    from bench.chaos.security import create_key, raw_request, wait_api
    from tests.conftest import free_port

    port = free_port()
    big = make_cine(work / "api-upload.dcm", 31, 30, 320, 320)  # ~3 MB
    data = big.read_bytes()
    grace = 10.0
    with deployment(work / f"api-{pause}", LUSAI_API_PORT=str(port), LUSAI_SHUTDOWN_GRACE=str(grace)) as d:
        api = d.start("api", ["api"])
        wait_api(port, api)
        key = create_key(d, "write", "read")
        upload: dict[str, Any] = {}

        def trickle() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            try:
                conn.putrequest("POST", "/api/v1/instances")
                conn.putheader("X-API-Key", key)
                conn.putheader("Content-Type", "application/dicom")
                conn.putheader("Content-Length", str(len(data)))
                conn.endheaders()
                step = 32768
                for i in range(0, len(data), step):
                    conn.send(data[i : i + step])
                    time.sleep(pause)
                resp = conn.getresponse()
                upload["status"] = resp.status
                upload["body"] = resp.read()[:200].decode(errors="replace")
            except Exception as exc:
                upload["status"] = f"error:{type(exc).__name__}"
            finally:
                conn.close()

        reads: list[int] = []

        def reader() -> None:
            for _ in range(200):
                status, _ = raw_request(port, "GET", "/api/v1/studies", {"X-API-Key": key})
                reads.append(status)
                if status < 0:
                    return
                time.sleep(0.02)

        threads = [threading.Thread(target=trickle), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        time.sleep(2)
        out = terminate(api)
        for t in threads:
            t.join(120)
        storage = Path(d.env["LUSAI_DATA_DIR"]) / "storage"
        books = integrity(d, storage, [])
        d.procs.stop_all()
    indexed = books["rows"]
    out |= {
        "upload_in_flight": upload.get("status"),
        "reads": {str(s): reads.count(s) for s in sorted(set(reads))},
        **books,
    }
    out["ok"] = (
        not out["hung"]
        and not out["left_running"]
        and ((upload.get("status") == 202 and indexed == 1) or (upload.get("status") != 202 and indexed == 0))
        and books["rows_without_bytes"] == 0
        and books["stored_without_row"] == 0
        and out["time_to_exit_s"] <= grace + 5
    )
    return out


# --- serve -------------------------------------------------------------------------------------


def case_serve(work: Path, quick: bool) -> dict[str, Any]:
    from pynetdicom import _config

    from tests.conftest import free_port
    from tests.test_production import Procs

    _config.STORE_SEND_CHUNKED_DATASET = True
    data = work / "serve" / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env |= {
        "LUSAI_DATA_DIR": str(data),
        "LUSAI_DICOM_PORT": str(free_port()),
        "LUSAI_API_PORT": str(free_port()),
        "LUSAI_ALLOWED_CALLING_AES": CALLING_AE,
        "LUSAI_LOG_FORMAT": "json",
        "LUSAI_SHUTDOWN_GRACE": "2",
        "LUSAI_RECOVERY_INTERVAL": "2",
    }
    port = int(env["LUSAI_DICOM_PORT"])
    (work / "serve").mkdir(parents=True, exist_ok=True)
    procs = Procs(work / "serve")
    job_cine = make_cine(work / "serve-job.dcm", 41, 24 if quick else 48, 0, 0, phantom=True)
    stream_files = [
        make_cine(work / f"serve-{i}.dcm", 50 + i, 40, 384, 384) for i in range(3 if quick else 6)
    ]
    try:
        serve = procs.start("serve", ["serve"], env)
        wait_for_echo(port, serve, timeout=120)
        status = send_one(port, job_cine)
        db = data / "lusai.sqlite"
        running = wait_job(db, {"running"}, 180, poll=0.02)
        stream = Streamer(port, stream_files)
        stream.start()
        deadline = time.monotonic() + 30
        while not stream.results and time.monotonic() < deadline:
            time.sleep(0.01)
        out = terminate(serve)
        stream.join(60)
        state_at_exit = rows(db, "SELECT state FROM jobs ORDER BY id")[0][0]  # the job in hand
        t0 = time.monotonic()
        procs.start("serve2", ["serve"], env)
        successes = [u for u, o in stream.results if o == "0x0000"]
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            states = [r[0] for r in rows(db, "SELECT state FROM jobs")]
            if len(states) >= 1 + len(successes) and all(s in ("succeeded", "failed") for s in states):
                break
            time.sleep(1)
        catch_up = round(time.monotonic() - t0, 1)
        jobs = rows(
            db,
            "SELECT j.state, j.attempts, (SELECT count(*) FROM results r WHERE r.job_id = j.id) FROM jobs j",
        )
        books = integrity(db, data / "storage", successes)
    finally:
        procs.stop_all()
    out |= {
        "c_store_job": status,
        "job_state_at_sigterm": running,
        "job_state_at_exit": state_at_exit,
        "c_store_outcomes_in_progress": {
            o: [x for _, x in stream.results].count(o) for o in {x for _, x in stream.results}
        },
        "restart_until_all_analysed_s": catch_up,
        "jobs_by_state": {s: sum(1 for j in jobs if j[0] == s) for s in {j[0] for j in jobs}},
        "jobs_without_exactly_one_result": sum(1 for j in jobs if j[2] != 1),
        **books,
    }
    out["ok"] = (
        not out["hung"]
        and not out["left_running"]
        and all(j[0] == "succeeded" for j in jobs)
        and out["jobs_without_exactly_one_result"] == 0
        and books["success_without_row"] == 0
        and books["rows_without_bytes"] == 0
        and books["stored_without_row"] == 0
    )
    return out


CASES = ("scp", "scp-processes", "worker", "worker-grace-expired", "api", "api-slow-client", "serve")


def run(work: Path, quick: bool, only: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"cases": {}}
    for name in only:
        t0 = time.monotonic()
        if name == "scp":
            r = case_scp(work, quick)
        elif name == "scp-processes":
            r = case_scp(work, quick, processes=3)
        elif name == "worker":
            r = case_worker(work, quick, grace=60)
        elif name == "worker-grace-expired":
            r = case_worker(work, quick, grace=1)
        elif name == "api":
            r = case_api(work, quick)
        elif name == "api-slow-client":
            r = case_api(work, quick, pause=0.6)  # ~55 s of upload: longer than the grace
        else:
            r = case_serve(work, quick)
        r["case_s"] = round(time.monotonic() - t0, 1)
        print(f"{'PASS' if r['ok'] else 'FAIL'} {name} {json.dumps(r, default=str)[:600]}", file=sys.stderr)
        out["cases"][name] = r
    out |= phi_hits(work)
    out["ok"] = all(c["ok"] for c in out["cases"].values()) and out["phi_hits"] == 0
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer and smaller objects")
    p.add_argument("--only", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    only = [c for c in a.only.split(",") if c]
    if unknown := set(only) - set(CASES):
        p.error(f"unknown cases: {sorted(unknown)}")
    with tempfile.TemporaryDirectory(prefix="chaos-shutdown-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = run(work, a.quick, only)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
