"""Load benchmark of the REST API's results queries with 100k stored results.

    /tmp/lusai-venv/bin/python bench/api.py [--results 100000] [--rate 200] [--duration 30]
                                            [--db-url URL] [--workers 2] [--out bench-api.json]

Seeds a PostgreSQL database (default ``lusai_bench`` on 127.0.0.1, reused when it already holds
the requested number of results) with studies of five zone clips each, every clip analysed with
a result, then starts the API as in production (``uvicorn --factory service.api.main:create_app``,
uvloop, httptools, no access log) with one ``read`` API key, and measures:

* **open loop** at ``--rate`` requests/s for ``--duration`` s: requests are sent on a fixed
  schedule whatever the server does, and latency is counted from the scheduled send time, so a
  stalled server cannot hide its queueing (no coordinated omission). Target: p99 < 50 ms at 200/s.
* **closed loop** with 8 concurrent connections for 10 s: the throughput ceiling.

The mix is what dashboards and EHR integrations send: 50% ``GET /instances/{uid}/result`` (one
clip's result with per-frame scores and measurements), 30% ``GET /results?score_min=..`` (the
polling list, a quarter of them on a later page by cursor), 20% ``GET /studies/{uid}/results``
(zone scores and patient total). Every request is authenticated, rate-limit checked and audited
(one INSERT each), as in production. Prints and writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import create_engine, func, insert, select, text

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from service.core.models import Instance, InstanceState, Job, JobState, Result, Series, Study  # noqa: E402

ZONES = ["R1", "R2", "R3", "L1", "L2", "L3"]
PER_STUDY = 5
CHUNK = 5000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ensure_database(url: str) -> None:
    base, name = url.rsplit("/", 1)
    admin = create_engine(f"{base}/postgres", isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        if not c.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}):
            c.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()


def seed(url: str, n_results: int) -> dict[str, Any]:
    """Bulk-insert studies/series/instances/jobs/results with explicit IDs; returns the UIDs to query."""
    from migrations.runner import upgrade

    if url.startswith("postgresql"):
        ensure_database(url)
    upgrade(url)
    engine = create_engine(url)
    with engine.connect() as c:
        have = c.scalar(select(func.count()).select_from(Result)) or 0
    if have != n_results:
        t0 = time.perf_counter()
        with engine.begin() as c:
            if url.startswith("postgresql"):
                c.execute(
                    text(
                        "TRUNCATE studies, series, instances, jobs, results, deliveries, audit_events"
                        " RESTART IDENTITY CASCADE"
                    )
                )
            else:
                for t in ("deliveries", "results", "jobs", "instances", "series", "studies"):
                    c.execute(text(f"DELETE FROM {t}"))
        rng = random.Random(7)
        now = datetime.now(UTC)
        n_studies = (n_results + PER_STUDY - 1) // PER_STUDY
        k = 0
        for start in range(0, n_studies, CHUNK // PER_STUDY):
            studies, series, instances, jobs, results = [], [], [], [], []
            for s in range(start, min(n_studies, start + CHUNK // PER_STUDY)):
                sid = s + 1
                day = now - timedelta(days=s % 700)
                studies.append({
                    "id": sid, "study_instance_uid": f"1.2.826.0.1.3680043.10.999.1.{sid}",
                    "patient_id": f"P{sid % 9000:06d}", "accession_number": f"A{sid:08d}",
                    "study_date": day.strftime("%Y%m%d"), "study_description": "Lung ultrasound",
                    "created_at": day,
                })  # fmt: skip
                for z in rng.sample(ZONES, PER_STUDY):
                    if k >= n_results:
                        break
                    k += 1
                    score = rng.choices([0, 1, 2, 3], weights=[40, 30, 20, 10])[0]
                    frames = [max(0, min(3, score + rng.choice([-1, 0, 0, 0]))) for _ in range(60)]
                    series.append({
                        "id": k, "series_instance_uid": f"1.2.826.0.1.3680043.10.999.2.{k}", "study_id": sid,
                        "modality": "US", "series_number": k, "series_description": f"LUS {z}",
                        "body_part": "CHEST",
                        "created_at": day,
                    })  # fmt: skip
                    instances.append({
                        "id": k, "sop_instance_uid": f"1.2.826.0.1.3680043.10.999.3.{k}", "version": 1,
                        "series_id": k, "sop_class_uid": "1.2.840.10008.5.1.4.1.1.3.1",
                        "transfer_syntax_uid": "1.2.840.10008.1.2.4.50", "frames": 60, "rows": 600,
                        "columns": 800,
                        "photometric": "YBR_FULL_422", "calling_ae": f"US{sid % 12:02d}", "received_at": day,
                        "storage_key": f"objects/00/00/{k:064x}.dcm", "sha256": f"{k:064x}",
                        "size_bytes": 4_000_000,
                        "state": InstanceState.ACCEPTED, "ignore_reason": None,
                    })  # fmt: skip
                    jobs.append({
                        "id": k, "instance_id": k, "state": JobState.SUCCEEDED, "attempts": 1, "error": None,
                        "model_version": "1.0.0", "worker": "bench:1", "created_at": day, "enqueued_at": day,
                        "started_at": day, "finished_at": day,
                        "timings_ms": {"decode": 310.2, "infer": 1400.5, "score": 80.1, "write": 120.4},
                    })  # fmt: skip
                    results.append({
                        "id": k, "job_id": k, "instance_id": k, "score": score, "frame_scores": frames,
                        "key_frame": frames.index(max(frames)), "b_line_fraction": round(rng.random(), 3),
                        "b_line_count": rng.randint(0, 8), "consolidation": score == 3,
                        "effusion": rng.random() < 0.1,
                        "measurements": {"bla_score": round(rng.random(), 3), "consolidation_area_mm2": 0.0,
                                         "effusion_area_mm2": 0.0, "pleura_irregular": score >= 2,
                                         "frames": []},
                        "model_name": "lusnet", "model_version": "1.0.0", "weights_sha256": "ab" * 32,
                        "seg_sop_instance_uid": f"1.2.826.0.1.3680043.10.999.4.{k}",
                        "seg_storage_key": f"objects/00/00/{k:064x}.dcm", "created_at": day,
                    })  # fmt: skip
            with engine.begin() as c:
                for table, rows in ((Study, studies), (Series, series), (Instance, instances), (Job, jobs),
                                    (Result, results)):  # fmt: skip
                    if rows:
                        c.execute(insert(table), rows)
        with engine.begin() as c:
            if url.startswith("postgresql"):
                for t in ("studies", "series", "instances", "jobs", "results"):
                    c.execute(
                        text(f"SELECT setval(pg_get_serial_sequence('{t}', 'id'), (SELECT max(id) FROM {t}))")
                    )
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text("ANALYZE"))
        print(f"seeded {n_results} results in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    with engine.connect() as c:
        n = c.scalar(select(func.count()).select_from(Result)) or 0
        n_studies = c.scalar(select(func.count()).select_from(Study)) or 0
    engine.dispose()
    return {"results": n, "studies": n_studies}


def make_key(url: str) -> str:
    from service.api.auth import create_api_key
    from service.core.db import Database

    db = Database(url)
    try:
        with db.session() as s:
            _row, token = create_api_key(s, "bench", ["read"], rate_limit=0)
    finally:
        db.dispose()
    return token


def start_server(url: str, port: int, workers: int, data_dir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "LUSAI_DATABASE_URL": url,
        "LUSAI_DATA_DIR": str(data_dir),
        "LUSAI_LOG_LEVEL": "WARNING",
    }
    argv = [
        sys.executable, "-m", "uvicorn", "--factory", "service.api.main:create_app", "--host", "127.0.0.1",
        "--port", str(port), "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
        "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, env=env, cwd=REPO, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health/live", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("API did not start")


def tree_cpu_seconds(pid: int) -> float:
    """user+system CPU of a process and its children (the uvicorn workers), from /proc."""
    total = 0.0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError, IndexError):
            continue
    return total


class Mix:
    """Random requests in the documented proportions, over the seeded UIDs."""

    def __init__(self, n_results: int, n_studies: int, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.n_results = n_results
        self.n_studies = n_studies
        self.cursors: list[str] = []

    def next(self) -> tuple[str, str]:
        x = self.rng.random()
        if x < 0.5:
            k = self.rng.randint(1, self.n_results)
            return "instance_result", f"/api/v1/instances/1.2.826.0.1.3680043.10.999.3.{k}/result"
        if x < 0.8:
            if self.cursors and self.rng.random() < 0.25:
                return "results_list", f"/api/v1/results?limit=50&cursor={self.rng.choice(self.cursors)}"
            return "results_list", f"/api/v1/results?limit=50&score_min={self.rng.randint(0, 3)}"
        s = self.rng.randint(1, self.n_studies)
        return "study_results", f"/api/v1/studies/1.2.826.0.1.3680043.10.999.1.{s}/results"


def summarize(lat_ms: list[float], errors: int, elapsed: float) -> dict[str, Any]:
    lat = sorted(lat_ms)
    if not lat:
        return {"requests": 0, "errors": errors}

    def pct(p: float) -> float:
        return round(lat[min(len(lat) - 1, int(p / 100 * len(lat)))], 2)

    return {
        "requests": len(lat), "errors": errors, "rps": round(len(lat) / elapsed, 1),
        "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99), "max_ms": round(lat[-1], 2),
        "mean_ms": round(statistics.fmean(lat), 2),
    }  # fmt: skip


class Conn:
    """One keep-alive HTTP/1.1 connection with just enough parsing for our JSON responses.

    httpx spends ~1 ms of CPU per request, as much as the server: on a 2-core machine the load
    generator would measure itself. This costs a few tens of microseconds.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, token: str) -> None:
        self.reader, self.writer, self.token = reader, writer, token

    @classmethod
    async def open(cls, host: str, port: int, token: str) -> Conn:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, token)

    async def get(self, path: str) -> tuple[int, bytes]:
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: bench\r\nX-API-Key: {self.token}\r\n\r\n".encode())
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        body = await self.reader.readexactly(length)
        return status, body

    def close(self) -> None:
        self.writer.close()


async def open_loop(
    host: str, port: int, token: str, mix: Mix, rate: float, duration: float
) -> dict[str, Any]:
    """Fixed-rate schedule; latency from the scheduled time (includes waiting for a free connection)."""
    per_kind: dict[str, list[float]] = {}
    errors = 0
    idle: asyncio.Queue[Conn] = asyncio.Queue()
    for _ in range(32):
        idle.put_nowait(await Conn.open(host, port, token))

    async def one(kind: str, url: str, scheduled: float) -> None:
        nonlocal errors
        conn = await idle.get()
        try:
            status, body = await conn.get(url)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            errors += 1
            idle.put_nowait(await Conn.open(host, port, token))
            return
        idle.put_nowait(conn)
        if status != 200:
            errors += 1
            return
        per_kind.setdefault(kind, []).append((time.perf_counter() - scheduled) * 1000)
        if kind == "results_list" and len(mix.cursors) < 200:
            cur = json.loads(body).get("next_cursor")
            if cur:
                mix.cursors.append(cur)

    tasks = []
    t0 = time.perf_counter()
    for i in range(int(rate * duration)):
        scheduled = t0 + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        kind, url = mix.next()
        tasks.append(asyncio.create_task(one(kind, url, scheduled)))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - t0
    while not idle.empty():
        idle.get_nowait().close()
    everything = [x for v in per_kind.values() for x in v]
    out = {"target_rps": rate, **summarize(everything, errors, elapsed)}
    out["by_query"] = {k: summarize(v, 0, elapsed) for k, v in sorted(per_kind.items())}
    return out


async def closed_loop(
    host: str, port: int, token: str, mix: Mix, concurrency: int, duration: float
) -> dict[str, Any]:
    lat: list[float] = []
    errors = 0
    stop = time.perf_counter() + duration

    async def worker() -> None:
        nonlocal errors
        conn = await Conn.open(host, port, token)
        while time.perf_counter() < stop:
            _kind, url = mix.next()
            t = time.perf_counter()
            status, _ = await conn.get(url)
            if status != 200:
                errors += 1
                continue
            lat.append((time.perf_counter() - t) * 1000)
        conn.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, **summarize(lat, errors, elapsed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db-url", default="postgresql+psycopg2://postgres@127.0.0.1:5432/lusai_bench")
    ap.add_argument("--results", type=int, default=100_000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--workers", type=int, default=2, help="uvicorn worker processes (2 = the cores here)")
    ap.add_argument("--skip-closed", action="store_true", help="Skip the closed-loop throughput run.")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    counts = seed(args.db_url, args.results)
    token = make_key(args.db_url)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(args.db_url, port, args.workers, Path(tmp))
        try:
            host = "127.0.0.1"
            mix = Mix(counts["results"], counts["studies"])
            asyncio.run(
                open_loop(host, port, token, mix, args.rate, 3.0)
            )  # warm-up: connections, plan caches
            report: dict[str, Any] = {
                "machine": {"cpus": os.cpu_count(), "load_avg_before": os.getloadavg(),
                            "python": platform.python_version()},
                "database": args.db_url.split("://", 1)[0], "stored": counts, "api_workers": args.workers,
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
            }  # fmt: skip
            cpu0 = tree_cpu_seconds(proc.pid)
            report["open_loop"] = asyncio.run(open_loop(host, port, token, mix, args.rate, args.duration))
            served = report["open_loop"].get("requests", 0) + report["open_loop"].get("errors", 0)
            # CPU of the API processes per request: less sensitive to the neighbours than latency
            report["open_loop"]["api_cpu_ms_per_request"] = round(
                (tree_cpu_seconds(proc.pid) - cpu0) * 1000 / max(served, 1), 2
            )
            if not args.skip_closed:
                report["closed_loop"] = asyncio.run(closed_loop(host, port, token, mix, 8, 10.0))
            report["machine"]["load_avg_after"] = os.getloadavg()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
    ol = report["open_loop"]
    report["target_met"] = bool(ol.get("p99_ms", 1e9) < 50 and ol.get("errors", 1) == 0)
    text_out = json.dumps(report, indent=2)
    print(text_out)
    if args.out:
        args.out.write_text(text_out + "\n")


if __name__ == "__main__":
    main()
