"""Fuzz lusai's SCP, upload endpoint and worker with structure-aware DICOM mutants.

    .venv/bin/python bench/chaos/fuzz.py [--quick] [--count N] [--rest N] [--out fuzz.json]

Starts ``lusai scp`` and ``lusai api`` on embedded defaults (SQLite and the filesystem queue in a
temporary LUSAI_DATA_DIR), creates a write API key with ``lusai apikey create``, sends mutants from
``bench/chaos/mutate.py`` through real associations (pynetdicom ``send_c_store`` on a file path,
so bytes pydicom could not parse still go out; one object per C-STORE, a DIMSE timeout on each)
and over ``POST /api/v1/instances``, then runs ``lusai worker`` until no job is queued, running
or retrying. Figures (JSON): objects sent per channel, DIMSE statuses and HTTP codes by kind,
crashes (a process that died), hung sends, storage/index consistency, job outcomes (and those of
header-valid cines with corrupt pixel data), peak RSS (VmHWM of each process tree), elapsed time,
and PHI-marker hits in every log line. Exit 1 when a zero target is missed.

Full size: 10,000 mutants through the SCP and 2,000 over REST; ``--quick``: 160 + 40.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402
from pynetdicom import AE, _config  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402

from bench.chaos.mutate import PHI_MARKERS, SOP_CLASSES, SYNTAXES, Mutant, make  # noqa: E402
from service.cli.serve import process_tree  # noqa: E402
from tests.conftest import free_port  # noqa: E402
from tests.test_production import Procs  # noqa: E402

_config.STORE_SEND_CHUNKED_DATASET = True  # send the file's bytes as they are, never re-encoded
DIMSE_TIMEOUT = 60.0
PER_ASSOCIATION = 40
TERMINAL = ("succeeded", "failed", "cancelled")


def wait_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise RuntimeError(f"nothing listens on port {port}")


# --- process watch -------------------------------------------------------------------------------


def _hwm_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Watch(threading.Thread):
    """Samples VmHWM of each process tree and notes a process that died while it should run."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.peak_kib: dict[str, int] = defaultdict(int)
        self.died: dict[str, int] = {}
        self.stopping: set[str] = set()
        self.halt = threading.Event()

    def add(self, name: str, proc: subprocess.Popen[bytes]) -> None:
        self.procs[name] = proc

    def run(self) -> None:
        while not self.halt.wait(0.5):
            try:
                self.sample()
            except Exception as exc:  # a sample lost; the watch goes on (it ended on a vanished pid)
                print(f"process watch: sample failed ({type(exc).__name__})", file=sys.stderr)

    def sample(self) -> None:
        for name, proc in list(self.procs.items()):
            if proc.poll() is not None:
                if name not in self.stopping and name not in self.died:
                    self.died[name] = int(proc.returncode)
                continue
            for pid in (proc.pid, *process_tree(proc.pid)):
                self.peak_kib[name] = max(self.peak_kib[name], _hwm_kib(pid))


# --- senders -------------------------------------------------------------------------------------


def _ae() -> AE:
    ae = AE(ae_title="FUZZER")
    for sop in SOP_CLASSES:
        for ts in SYNTAXES:  # one context per syntax, so the file goes out as written
            ae.add_requested_context(sop, ts)
    ae.dimse_timeout = DIMSE_TIMEOUT
    ae.acse_timeout = 30
    ae.network_timeout = DIMSE_TIMEOUT
    return ae


def send_scp(port: int, mutants: list[Mutant], work: Path) -> list[dict[str, object]]:
    """C-STORE each mutant on as few associations as possible; a new one after an abort."""
    ae, out, assoc = _ae(), [], None
    path = work / f"wire-{threading.get_ident()}.dcm"
    try:
        for i, m in enumerate(mutants):
            if assoc is None or not assoc.is_established or i % PER_ASSOCIATION == 0:
                if assoc is not None and assoc.is_established:
                    assoc.release()
                assoc = ae.associate("127.0.0.1", port, ae_title="LUSAI")
                if not assoc.is_established:
                    out.append(_row(m, "scp", "association-refused", 0.0))
                    assoc = None
                    continue
            path.write_bytes(m.wire())
            t0 = time.monotonic()
            try:
                status = assoc.send_c_store(path)
                elapsed = time.monotonic() - t0
                if "Status" in status:
                    code = f"0x{int(status.Status):04X}"
                elif elapsed >= DIMSE_TIMEOUT - 1:
                    code = "hung"
                else:
                    code = "aborted"
            except (ValueError, AttributeError, RuntimeError) as exc:  # no context / unreadable meta
                elapsed, code = time.monotonic() - t0, f"not-sent:{type(exc).__name__}"
            out.append(_row(m, "scp", code, elapsed))
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()
        path.unlink(missing_ok=True)
    return out


def send_rest(base: str, key: str, mutants: list[Mutant]) -> list[dict[str, object]]:
    out = []
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=DIMSE_TIMEOUT) as client:
        for m in mutants:
            t0 = time.monotonic()
            try:
                r = client.post(
                    "/api/v1/instances", content=m.data, headers={"Content-Type": "application/dicom"}
                )
                code = str(r.status_code)
            except httpx.TimeoutException:
                code = "hung"
            except httpx.HTTPError as exc:
                code = f"error:{type(exc).__name__}"
            out.append(_row(m, "rest", code, time.monotonic() - t0))
    return out


def _row(m: Mutant, channel: str, code: str, elapsed: float) -> dict[str, object]:
    return {
        "index": m.index,
        "kind": m.kind,
        "family": m.family,
        "channel": channel,
        "code": code,
        "s": round(elapsed, 4),
        "uid": m.sop_instance_uid,
        "uids": m.uids,
        "pixel_only": m.pixel_only,
        "bytes": len(m.data),
    }


# --- checks --------------------------------------------------------------------------------------


def consistency(engine, storage: Path) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Files in the object store against every key the database names."""
    keys: set[str] = set()
    with engine.connect() as c:
        for sql in (
            "SELECT storage_key FROM instances",
            "SELECT storage_key FROM deliveries",
            "SELECT seg_storage_key FROM results",
            "SELECT sr_storage_key FROM results",
            "SELECT sc_storage_key FROM results",
            "SELECT preview_png_key FROM results",
            "SELECT preview_gif_key FROM results",
            "SELECT preview_webp_key FROM results",
        ):
            keys |= {r[0] for r in c.execute(text(sql)) if r[0]}
        instance_keys = {r[0] for r in c.execute(text("SELECT storage_key FROM instances"))}
    files = {str(p.relative_to(storage)) for p in (storage / "objects").rglob("*") if p.is_file()}
    return {
        "files": len(files),
        "indexed_keys": len(keys),
        "stored_not_indexed": len(files - keys),
        "indexed_not_stored": len(keys - files),
        "instances_missing_file": len(instance_keys - files),
        "temp_files_left": sum(1 for _ in (storage / "tmp").glob("*")),
    }


def job_figures(engine, kinds: dict[str, dict[str, object]]) -> dict[str, object]:  # type: ignore[no-untyped-def]
    with engine.connect() as c:
        rows = c.execute(
            text(
                "SELECT i.sop_instance_uid, j.state, j.error, j.attempts FROM jobs j "
                "JOIN instances i ON i.id = j.instance_id"
            )
        ).all()
    states: dict[str, Counter[str]] = defaultdict(Counter)
    errors: dict[str, Counter[str]] = defaultdict(Counter)
    unclear = []
    for uid, state, error, _attempts in rows:
        kind = str(kinds.get(uid, {}).get("kind", "?"))
        states[kind][state] += 1
        if state == "failed":
            errors[kind][(error or "")[:120]] += 1
        if state not in ("succeeded", "cancelled") and not (state == "failed" and error and error.strip()):
            unclear.append({"uid_kind": kind, "state": state, "error": error})
    pixel = Counter(state for uid, state, _, _ in rows if kinds.get(uid, {}).get("pixel_only"))
    # a corrupt codestream must fail as unusable input, with the reason, never as an internal error
    pixel_unclear = sum(
        1
        for uid, state, error, _ in rows
        if kinds.get(uid, {}).get("pixel_only")
        and state == "failed"
        and not (error or "").startswith("input rejected: ")
    )
    return {
        "jobs": len(rows),
        "by_kind": {k: dict(v) for k, v in sorted(states.items())},
        "errors_by_kind": {k: dict(v.most_common(5)) for k, v in sorted(errors.items())},
        "pixel_corrupt_jobs": dict(pixel),
        "pixel_corrupt_unclear_errors": pixel_unclear,
        "not_ended_cleanly": len(unclear),
        "not_ended_cleanly_sample": unclear[:10],
    }


UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+){3,}")


def phi_scan(root: Path, uids: set[str]) -> dict[str, object]:
    """PHI markers, and the objects' own UIDs (lusai never logs them), in every log line."""
    hits, uid_hits, lines, files = [], [], 0, 0
    for path in root.rglob("*.log"):
        files += 1
        with open(path, errors="replace") as fh:
            for n, line in enumerate(fh, 1):
                lines += 1
                if any(marker in line for marker in PHI_MARKERS):
                    hits.append(f"{path.name}:{n}: {line[:160].rstrip()}")
                if any(u in uids for u in UID_RE.findall(line)):
                    uid_hits.append(f"{path.name}:{n}: {line[:160].rstrip()}")
    return {
        "log_files": files,
        "log_lines": lines,
        "phi_hits": len(hits),
        "phi_hit_sample": hits[:5],
        "uid_hits": len(uid_hits),
        "uid_hit_sample": uid_hits[:5],
    }


def tracebacks(root: Path) -> dict[str, int]:
    return {p.name: p.read_text(errors="replace").count("Traceback") for p in root.glob("*.log")}


# --- the run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix="lusai-fuzz-"))
    data = work / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    dicom_port, api_port = free_port(), free_port()
    env |= {
        "LUSAI_DATA_DIR": str(data),
        "LUSAI_DICOM_PORT": str(dicom_port),
        "LUSAI_API_PORT": str(api_port),
        "LUSAI_API_RATE_LIMIT": "0",
        "LUSAI_LOG_LEVEL": "INFO",
        "LUSAI_RECOVERY_INTERVAL": "5",
        "LUSAI_DIMSE_TIMEOUT": "30",
        "LUSAI_WORKER_CONCURRENCY": str(args.worker_concurrency),
    }
    cli = [sys.executable, "-m", "service"]
    subprocess.run([*cli, "db", "upgrade"], env=env, check=True, timeout=120, capture_output=True)
    key = subprocess.run(
        [*cli, "apikey", "create", "fuzzer", "--scope", "write", "--scope", "read", "--rate-limit", "0"],
        env=env, check=True, timeout=120, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]  # fmt: skip
    procs = Procs(work)
    watch = Watch()
    watch.add("scp", procs.start("scp", ["scp"], env))
    watch.add("api", procs.start("api", ["api"], env))
    watch.start()
    t_start = time.monotonic()
    try:
        wait_port(dicom_port)
        wait_port(api_port)
        n_scp, n_rest = args.count, args.rest
        mutants_scp = [i for i in range(n_scp)]
        mutants_rest = [n_scp + i for i in range(n_rest)]
        rows: list[dict[str, object]] = []
        kinds: dict[str, dict[str, object]] = {}

        def scp_chunk(idx: list[int]) -> list[dict[str, object]]:
            return send_scp(dicom_port, [make(args.seed, i) for i in idx], work)

        def rest_chunk(idx: list[int]) -> list[dict[str, object]]:
            return send_rest(f"http://127.0.0.1:{api_port}", key, [make(args.seed, i) for i in idx])

        chunk = PER_ASSOCIATION
        with ThreadPoolExecutor(args.senders) as pool:
            futures = [pool.submit(scp_chunk, mutants_scp[i : i + chunk]) for i in range(0, n_scp, chunk)]
            futures += [pool.submit(rest_chunk, mutants_rest[i : i + chunk]) for i in range(0, n_rest, chunk)]
            for f in futures:
                rows += f.result()
        t_sent = time.monotonic()
        for r in rows:
            kinds[str(r["uid"])] = r
        watch.sample()

        # the worker: drain every job
        watch.add("worker", procs.start("worker", ["worker"], env))
        engine = create_engine(f"sqlite:///{data / 'lusai.sqlite'}")
        deadline = time.monotonic() + args.worker_timeout
        open_jobs = -1
        while time.monotonic() < deadline:
            with engine.connect() as c:
                open_jobs = int(
                    c.execute(
                        text("SELECT count(*) FROM jobs WHERE state IN ('queued','running','retrying')")
                    ).scalar()
                    or 0
                )
            if open_jobs == 0 or "worker" in watch.died:
                break
            time.sleep(2)
        t_drained = time.monotonic()
        watch.sample()
        for name in watch.procs:
            watch.stopping.add(name)
        procs.stop_all()
        watch.halt.set()

        by_kind: dict[str, dict[str, Counter[str]]] = defaultdict(lambda: defaultdict(Counter))
        for r in rows:
            by_kind[str(r["channel"])][str(r["kind"])][str(r["code"])] += 1
        codes = Counter(f"{r['channel']}:{r['code']}" for r in rows)
        scp_times = sorted(float(r["s"]) for r in rows if r["channel"] == "scp")  # type: ignore[arg-type]
        hung = sum(1 for r in rows if r["code"] == "hung")
        server_errors = sum(1 for r in rows if r["channel"] == "rest" and str(r["code"]).startswith("5"))
        server_errors -= sum(1 for r in rows if r["channel"] == "rest" and r["code"] == "507")
        store = consistency(engine, data / "storage")
        jobs = job_figures(engine, kinds)
        engine.dispose()
        phi = phi_scan(work, {str(u) for r in rows for u in r["uids"]})  # type: ignore[attr-defined]
        result: dict[str, object] = {
            "command": " ".join(["bench/chaos/fuzz.py", *sys.argv[1:]]),
            "seed": args.seed,
            "sent": {"scp": n_scp, "rest": n_rest},
            # an unknown SOP class has no accepted presentation context: the SCU cannot send it
            "scp_not_sent": sum(1 for r in rows if str(r["code"]).startswith("not-sent")),
            "codes": dict(codes.most_common()),
            "codes_by_kind": {ch: {k: dict(v) for k, v in sorted(d.items())} for ch, d in by_kind.items()},
            "crashes": dict(watch.died),
            "hung": hung,
            "rest_5xx": server_errors,
            "scp_store_s": {
                "p50": scp_times[len(scp_times) // 2] if scp_times else None,
                "p99": scp_times[int(len(scp_times) * 0.99)] if scp_times else None,
                "max": scp_times[-1] if scp_times else None,
            },
            "storage": store,
            "jobs": jobs,
            "jobs_open_at_end": open_jobs,
            "peak_rss_mib": {k: round(v / 1024, 1) for k, v in watch.peak_kib.items()},
            "elapsed_s": {
                "send": round(t_sent - t_start, 1),
                "drain": round(t_drained - t_sent, 1),
                "total": round(time.monotonic() - t_start, 1),
            },
            "tracebacks_in_logs": tracebacks(work),
            "logs": phi,
            "work_dir": str(work) if args.keep else None,
        }
        result["failures"] = failures(result)
        return result
    finally:
        for name in watch.procs:
            watch.stopping.add(name)
        procs.stop_all()
        watch.halt.set()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def failures(r: dict[str, object]) -> list[str]:
    out = []
    store, jobs, logs = r["storage"], r["jobs"], r["logs"]
    assert isinstance(store, dict) and isinstance(jobs, dict) and isinstance(logs, dict)
    if r["crashes"]:
        out.append(f"crashes: {r['crashes']}")
    if r["hung"]:
        out.append(f"hung sends: {r['hung']}")
    if r["rest_5xx"]:
        out.append(f"REST 5xx: {r['rest_5xx']}")
    for k in ("stored_not_indexed", "indexed_not_stored", "temp_files_left"):
        if store[k]:
            out.append(f"{k}: {store[k]}")
    if jobs["not_ended_cleanly"] or r["jobs_open_at_end"]:
        out.append(f"jobs not ended cleanly: {jobs['not_ended_cleanly']}, open: {r['jobs_open_at_end']}")
    if jobs["pixel_corrupt_unclear_errors"]:
        out.append(
            f"corrupt pixel data failed without a clear reason: {jobs['pixel_corrupt_unclear_errors']}"
        )
    if logs["phi_hits"] or logs["uid_hits"]:
        out.append(f"PHI in logs: {logs['phi_hits']} marker lines, {logs['uid_hits']} UID lines")
    controls = r["codes_by_kind"].get("scp", {}).get("valid", {})  # type: ignore[union-attr]
    if any(code != "0x0000" for code in controls):
        out.append(f"valid controls not stored: {controls}")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke size: 160 through the SCP, 40 over REST")
    p.add_argument("--count", type=int, help="mutants through the SCP (default 10000)")
    p.add_argument("--rest", type=int, help="mutants over REST (default 2000)")
    p.add_argument("--seed", type=int, default=12)
    p.add_argument("--senders", type=int, default=4, help="concurrent associations / HTTP clients")
    p.add_argument("--worker-concurrency", type=int, default=1, help="LUSAI_WORKER_CONCURRENCY")
    p.add_argument("--worker-timeout", type=float, default=None, help="seconds to drain the jobs")
    p.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    p.add_argument("--out", type=Path, default=Path("bench-fuzz.json"))
    args = p.parse_args()
    args.count = args.count if args.count is not None else (160 if args.quick else 10000)
    args.rest = args.rest if args.rest is not None else (40 if args.quick else 2000)
    args.worker_timeout = args.worker_timeout or (600 if args.quick else 7200)
    result = run(args)
    text_out = json.dumps(result, indent=2, default=str)
    print(text_out)
    args.out.write_text(text_out)
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
