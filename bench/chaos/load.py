"""Load: many concurrent associations of valid cines plus ~10% bad ones against a running lusai.

    .venv/bin/python bench/chaos/load.py [--quick] [--out chaos-load.json]
        [--concurrency 15] [--duration 120] [--pause 9] [--bad-fraction 0.1]

Production mode on this machine's real servers: ``lusai scp`` and ``lusai worker`` as separate
processes (the ``Procs`` harness of ``tests/test_production.py``) on a throw-away PostgreSQL
database and a Redis database index of their own. ``--concurrency`` sender processes each keep one
association open at a time (pynetdicom SCU, 3-8 objects per association with a pause of ``--pause``
seconds x U(0.5, 1.5) between them, a new association 0.2 s after each release) until
``--duration`` seconds have passed; every object
is streamed byte for byte from a Part 10 file, so broken ones reach the SCP as written.

The load: valid small cines (8 frames of 96x128, raw MONOCHROME2 or JPEG Baseline YBR_FULL_422)
with PHI markers in the patient fields, and ``--bad-fraction`` bad ones of three kinds:
``wrong_sop`` (a CT Image data set, half of them with file meta that says Ultrasound
Multi-frame; in the runs so far both were refused at presentation-context negotiation, the SCP
offering ultrasound classes only), ``truncated`` (the file cut at 40-90% of its bytes) and ``lying_frames``
(NumberOfFrames larger than the pixel data holds).

Figures (JSON): objects sent by kind, acceptance rate of the valid ones (target 100%), the bad
ones' statuses, p50/p99/max C-STORE time, lost objects (a Success without an Instance row or
stored bytes of the right SHA-256; target 0), bad objects indexed (0), valid cines not analysed
exactly once (one job, succeeded, one Result; target 0), RSS of the SCP and of the worker tree
sampled every second (median of the first vs the last quarter: flat), PHI-marker hits in every log
line the processes wrote (0), processes that died (0). Exit code 1 when a target is missed.

Scaled to this 2-core VM: the issue asks for 50 associations for 10 minutes; the full run here is
15 concurrent associations for 120 s with a mean pause of 8 s between a sender's objects
(``--quick``: 4 for 20 s, 1 s pauses). One CPU worker analyses ~1.3 of these cines per
second, so without pauses the backlog would take most of an hour to drain; the backlog left when
sending stops is drained (and timed) before the checks. The figures report the peak and mean
number of associations really open at once.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from pydicom.uid import CTImageStorage, generate_uid  # noqa: E402

from service.cli import serve  # noqa: E402

PG_ADMIN_URL = os.environ.get("LUSAI_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("LUSAI_TEST_REDIS_URL", "redis://127.0.0.1:6379")
CALLING_AE = "CHAOSSCU"

#: What every generated object carries, so a log scan can prove none of it reaches a log line.
PHI_NAME = "CHAOS^PHI^MARKER"
PHI_MARKERS = ("CHAOS^PHI^MARKER", "CHAOS PHI MARKER", "PHI-", "PHIACC")
PHI_PATTERN = re.compile("|".join(re.escape(m) for m in PHI_MARKERS))


# --- the deployment ----------------------------------------------------------------------------


def claim_redis_db(first: int = 11, last: int = 15) -> str:
    """A Redis database index of our own (the test suite's lock protocol), emptied."""
    import redis

    for db in range(first, last + 1):
        client = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        if client.set("lusai-test-lock", "chaos", nx=True, ex=3600):
            for key in client.scan_iter():
                if key != b"lusai-test-lock":
                    client.delete(key)
            return f"{REDIS_URL}/{db}"
    raise RuntimeError("no free Redis database index in 11-15")


@dataclass
class Deployment:
    """lusai in production mode: a throw-away PostgreSQL database, a Redis index, processes started
    with :class:`tests.test_production.Procs` (their logs in ``work/<name>.log``)."""

    work: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(init=False)
    db_name: str = field(init=False)

    def __post_init__(self) -> None:
        from sqlalchemy import create_engine, text

        from tests.conftest import free_port
        from tests.test_production import Procs

        self.work.mkdir(parents=True, exist_ok=True)
        self.db_name = f"lusai_chaos_{uuid.uuid4().hex[:10]}"
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{self.db_name}"'))
        admin.dispose()
        self.db_url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.db_name}"
        self.redis_url = claim_redis_db()
        env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
        env |= {
            "LUSAI_DATA_DIR": str(self.work / "data"),
            "LUSAI_DATABASE_URL": self.db_url,
            "LUSAI_BROKER_URL": self.redis_url,
            "LUSAI_DICOM_PORT": str(free_port()),
            "LUSAI_API_PORT": str(free_port()),
            "LUSAI_ALLOWED_CALLING_AES": CALLING_AE,
            "LUSAI_LOG_FORMAT": "json",
            "LUSAI_LOG_LEVEL": "INFO",
        }
        self.env = env | self.extra_env
        subprocess.run(
            [sys.executable, "-m", "service", "db", "upgrade"],
            env=self.env,
            check=True,
            timeout=120,
            capture_output=True,
        )
        self.procs = Procs(self.work)

    @property
    def port(self) -> int:
        return int(self.env["LUSAI_DICOM_PORT"])

    def start(self, name: str, args: list[str], **extra: str) -> subprocess.Popen[bytes]:
        return self.procs.start(name, args, self.env | extra)

    def engine(self) -> Any:
        from sqlalchemy import create_engine

        return create_engine(self.db_url, pool_pre_ping=True)  # survives a PostgreSQL restart

    def close(self) -> None:
        import redis
        from sqlalchemy import create_engine, text

        self.procs.stop_all()
        admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        admin.dispose()
        redis.Redis.from_url(self.redis_url).flushdb()


@contextlib.contextmanager
def deployment(work: Path, **extra_env: str) -> Iterator[Deployment]:
    d = Deployment(work, extra_env)
    try:
        yield d
    finally:
        d.close()


# --- processes: RSS, trees, logs ---------------------------------------------------------------


def process_tree(root: int) -> set[int]:
    """``root`` and every process below it that still exists (Linux /proc)."""
    return {p for p in {root} | serve.process_tree(root) if Path(f"/proc/{p}").exists()}


def rss_mib(pids: set[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1)


class RssSampler(threading.Thread):
    """RSS of each named process tree, once per ``interval`` seconds."""

    def __init__(self, roots: dict[str, int], interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.roots, self.interval = roots, interval
        self.samples: dict[str, list[float]] = {name: [] for name in roots}
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            for name, pid in self.roots.items():
                self.samples[name].append(rss_mib(process_tree(pid)))
            self.halt.wait(self.interval)

    def summary(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, s in self.samples.items():
            q = max(1, len(s) // 4)
            first, last = statistics.median(s[:q]), statistics.median(s[-q:])
            out[name] = {
                "samples": len(s),
                "first_quarter_median_mib": first,
                "last_quarter_median_mib": last,
                "peak_mib": max(s),
                "growth_mib": round(last - first, 1),
                # flat: under 10% plus 20 MiB of allocator slack between the quarters
                "flat": last <= first * 1.10 + 20,
            }
        return out


def phi_hits(folder: Path) -> dict[str, Any]:
    """Log lines under ``folder`` (``*.log``) that contain a PHI marker."""
    lines = hits = 0
    examples: list[str] = []
    for f in sorted(folder.rglob("*.log")):
        for line in f.read_text(errors="replace").splitlines():
            lines += 1
            if PHI_PATTERN.search(line):
                hits += 1
                if len(examples) < 5:
                    examples.append(f"{f.name}: {line[:300]}")
    return {"log_lines_scanned": lines, "phi_hits": hits, "examples": examples}


# --- the objects -------------------------------------------------------------------------------

VALID_KINDS = ("valid_raw", "valid_jpeg")
BAD_KINDS = ("wrong_sop", "truncated", "lying_frames")


def make_object(kind: str, folder: Path, rng: random.Random) -> tuple[Path, str]:
    """A Part 10 file of ``kind`` with fresh UIDs and PHI markers; returns (path, SOP Instance UID)."""
    from tests.factories import cine, save

    n = rng.randrange(1 << 30)
    ds = cine(
        "jpeg" if kind == "valid_jpeg" else "raw",
        frames=8,
        rows=96,
        cols=128,
        seed=n % 1000,
        study_uid=generate_uid(),
        series_uid=generate_uid(),
        sop_uid=generate_uid(),
        PatientName=PHI_NAME,
        PatientID=f"PHI-{n}",
        AccessionNumber=f"PHIACC{n % 10**9}",
    )
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{kind}-{n}.dcm"
    valid = True
    if kind == "wrong_sop":
        ds.SOPClassUID = CTImageStorage  # file meta (and so the C-STORE) still says US
        if rng.random() < 0.5:  # or a context the SCP does not offer at all
            ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    elif kind == "lying_frames":
        ds.NumberOfFrames = int(ds.NumberOfFrames) + rng.randrange(1, 50)
        valid = False
    save(ds, path, valid=valid)
    if kind == "truncated":
        data = path.read_bytes()
        path.write_bytes(data[: int(len(data) * rng.uniform(0.4, 0.9))])
    return path, str(ds.SOPInstanceUID)


def pick_kind(rng: random.Random, bad_fraction: float) -> str:
    if rng.random() < bad_fraction:
        return rng.choice(BAD_KINDS)
    return rng.choice(VALID_KINDS)


# --- the senders -------------------------------------------------------------------------------


def sender(args: tuple[int, int, float, float, str, int, float]) -> list[dict[str, Any]]:
    """One sender process: associations of 3-8 objects until ``deadline`` (time.time()), a pause
    of ``pause`` seconds (on average) between the objects of one association (a scanner sending an
    exam's loops as they are recorded), 0.2 s between associations."""
    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config

    index, port, deadline, bad_fraction, folder, seed, pause = args
    _config.STORE_SEND_CHUNKED_DATASET = True  # files go out byte for byte, broken ones too
    rng = random.Random(seed)
    work = Path(folder) / f"sender{index}"
    work.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    while time.time() < deadline:
        batch = [make_object(pick_kind(rng, bad_fraction), work, rng) for _ in range(rng.randint(3, 8))]
        ae = AE(ae_title=CALLING_AE)
        ae.maximum_pdu_size = 131072
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        contexts = set()
        for path, _uid in batch:
            meta = read_file_meta_info(path)
            contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        for sop, ts in sorted(contexts):
            ae.add_requested_context(sop, ts)
        opened = time.time()
        assoc = ae.associate("127.0.0.1", port, ae_title="LUSAI")
        assoc_s = time.time() - opened
        for n, (path, uid) in enumerate(batch):
            if n and assoc.is_established:  # the next loop of the exam, on the same association
                time.sleep(rng.uniform(0.5, 1.5) * pause)
            kind = path.name.split("-")[0]
            rec: dict[str, Any] = {"kind": kind, "uid": uid, "assoc_s": round(assoc_s, 4)}
            if not assoc.is_established:
                rec["outcome"] = "association-refused"
            else:
                t1 = time.monotonic()
                try:
                    rsp = assoc.send_c_store(path)
                    rec["status"] = int(rsp.Status) if "Status" in rsp else None
                    rec["outcome"] = "status" if rec["status"] is not None else "no-response"
                except ValueError:  # no accepted presentation context for it
                    rec["outcome"] = "context-rejected"
                rec["store_s"] = round(time.monotonic() - t1, 4)
            records.append(rec)
            path.unlink()
        if assoc.is_established:
            assoc.release()
        records[-1]["assoc_open"] = (round(opened, 3), round(time.time(), 3))  # one per association
        time.sleep(0.2)  # the next exam
    return records


# --- the run -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 4)


def wait_for_echo(port: int, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    from pynetdicom import AE

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"SCP exited with {proc.returncode}")
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="LUSAI")
        if assoc.is_established:
            assoc.release()
            return
        time.sleep(0.3)
    raise TimeoutError("SCP did not answer")


def peak_concurrency(records: list[dict[str, Any]]) -> dict[str, Any]:
    """How many associations were open at once: the peak, and the mean over the sending time."""
    events = []
    for r in records:
        if "assoc_open" in r:
            a, b = r["assoc_open"]
            events += [(a, 1), (b, -1)]
    events.sort()
    now = peak = 0
    busy = 0.0
    for i, (t, step) in enumerate(events):
        if i:
            busy += now * (t - events[i - 1][0])
        now += step
        peak = max(peak, now)
    span = events[-1][0] - events[0][0] if events else 0
    mean = round(busy / span, 2) if span else 0
    return {"associations": len(events) // 2, "peak_open": peak, "mean_open": mean}


def job_states(engine: Any) -> Counter[str]:
    from sqlalchemy import text

    with engine.connect() as c:
        rows = c.execute(text("SELECT state, count(*) FROM jobs GROUP BY state"))
        return Counter({r[0]: r[1] for r in rows})


def wait_drained(engine: Any, timeout: float) -> float:
    """Seconds until no job is queued or running (or ``timeout``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        try:
            s = job_states(engine)
        except Exception:  # PostgreSQL restarting (another campaign's fault): ask again
            time.sleep(1)
            continue
        if s and not (s.get("queued", 0) or s.get("running", 0)):
            break
        time.sleep(1)
    return round(time.monotonic() - t0, 1)


def check_rows(d: Deployment, records: list[dict[str, Any]]) -> dict[str, Any]:
    from sqlalchemy import text

    engine = d.engine()
    with engine.connect() as c:
        inst = {
            r[0]: r[1:]
            for r in c.execute(
                text(
                    "SELECT i.sop_instance_uid, i.storage_key, i.sha256, i.id, "
                    "(SELECT count(*) FROM jobs j WHERE j.instance_id = i.id), "
                    "(SELECT count(*) FROM jobs j WHERE j.instance_id = i.id AND j.state = 'succeeded'), "
                    "(SELECT count(*) FROM results r WHERE r.instance_id = i.id) FROM instances i"
                )
            )
        }
        errors = [r[0] for r in c.execute(text("SELECT error FROM jobs WHERE state = 'failed'"))]
    engine.dispose()
    storage = Path(d.env["LUSAI_DATA_DIR"]) / "storage"
    lost, not_once, bad_indexed = [], [], []
    for r in records:
        if r.get("status") == 0 and r["kind"] in VALID_KINDS:
            row = inst.get(r["uid"])
            f = storage / row[0] if row else None
            if row is None or f is None or not f.is_file() or sha256(f.read_bytes()).hexdigest() != row[1]:
                lost.append(r["uid"])
            elif row[3:] != (1, 1, 1):
                not_once.append({"uid": r["uid"], "jobs": row[3], "succeeded": row[4], "results": row[5]})
        if r["kind"] in BAD_KINDS and r["uid"] in inst:
            bad_indexed.append({"kind": r["kind"], "status": r.get("status")})
    return {
        "instances": len(inst),
        "lost": len(lost),
        "lost_uids": lost[:10],
        "valid_not_analysed_exactly_once": len(not_once),
        "not_once_examples": not_once[:10],
        "bad_objects_indexed": len(bad_indexed),
        "bad_indexed_examples": bad_indexed[:10],
        "failed_job_errors": Counter(e.split(":")[0] for e in errors if e),
    }


def run(
    concurrency: int, duration: float, bad_fraction: float, work: Path, seed: int, pause: float
) -> dict[str, Any]:
    from tests.factories import cine, save

    with deployment(work) as d:
        scp = d.start("scp", ["scp"])
        worker = d.start("worker", ["worker"], LUSAI_LOG_LEVEL="INFO")
        wait_for_echo(d.port, scp)
        # Warm-up: one cine analysed before the clock starts (model loaded, pools filled).
        warm = save(cine("raw", frames=8, rows=96, cols=128, PatientName=PHI_NAME), work / "warm.dcm")
        from tests.service.receive.conftest import send

        assert send(d.port, [warm], ae_title=CALLING_AE) == [0]
        engine = d.engine()
        wait_drained(engine, 300)
        sampler = RssSampler({"scp": scp.pid, "worker": worker.pid})
        sampler.start()
        deadline = time.time() + duration
        t0 = time.monotonic()
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(concurrency) as pool:
            args = [
                (i, d.port, deadline, bad_fraction, str(work / "objects"), seed + i, pause)
                for i in range(concurrency)
            ]
            records = [r for rs in pool.map(sender, args) for r in rs]
        send_s = round(time.monotonic() - t0, 1)
        drain_s = wait_drained(engine, 600)
        sampler.halt.set()
        sampler.join()
        states = job_states(engine)
        engine.dispose()
        alive = {"scp": scp.poll() is None, "worker": worker.poll() is None}
        rows = check_rows(d, records)
        d.procs.stop_all()
        phi = phi_hits(work)

    valid = [r for r in records if r["kind"] in VALID_KINDS]
    bad = [r for r in records if r["kind"] in BAD_KINDS]
    accepted = sum(1 for r in valid if r.get("status") == 0)
    times = [r["store_s"] for r in records if "store_s" in r]
    valid_times = [r["store_s"] for r in valid if "store_s" in r]
    bad_outcomes: dict[str, Counter[str]] = {}
    for r in bad:
        key = f"0x{r['status']:04X}" if r.get("status") is not None else r["outcome"]
        bad_outcomes.setdefault(r["kind"], Counter())[key] += 1
    bad_accepted = sum(1 for r in bad if r.get("status") == 0)
    rss = sampler.summary()
    out = {
        "mode": "production: lusai scp + lusai worker, PostgreSQL + Redis",
        "concurrency": concurrency,
        "duration_s": duration,
        "sending_s": send_s,
        "drain_after_sending_s": drain_s,
        "objects_sent": len(records),
        "by_kind": Counter(r["kind"] for r in records),
        "valid_sent": len(valid),
        "valid_accepted": accepted,
        "acceptance_rate_valid": round(accepted / len(valid), 6) if valid else None,
        "valid_outcomes": Counter(
            f"0x{r['status']:04X}" if r.get("status") is not None else r["outcome"] for r in valid
        ),
        "bad_sent": len(bad),
        "bad_refused_by_status": bad_outcomes,
        "bad_accepted": bad_accepted,
        "store_s_p50": percentile(times, 0.5),
        "store_s_p99": percentile(times, 0.99),
        "store_s_max": max(times) if times else None,
        "valid_store_s_p50": percentile(valid_times, 0.5),
        "valid_store_s_p99": percentile(valid_times, 0.99),
        "association_s_p99": percentile([r["assoc_s"] for r in records], 0.99),
        "associations_open": peak_concurrency(records),
        "objects_per_s": round(len(records) / send_s, 2) if send_s else None,
        "jobs_by_state": states,
        **rows,
        "rss": rss,
        "processes_alive_at_end": alive,
        **phi,
    }
    out["ok"] = bool(
        valid
        and accepted == len(valid)
        and bad_accepted == 0
        and rows["lost"] == 0
        and rows["valid_not_analysed_exactly_once"] == 0
        and rows["bad_objects_indexed"] == 0
        and all(alive.values())
        and all(v["flat"] for v in rss.values())
        and phi["phi_hits"] == 0
    )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke size: 4 senders for 20 s")
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--duration", type=float, default=None)
    p.add_argument("--bad-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=12)
    p.add_argument(
        "--pause", type=float, default=None, help="mean seconds between the objects of an association"
    )
    p.add_argument("--work", type=Path, default=None, help="keep processes' logs and data here")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    concurrency = a.concurrency or (4 if a.quick else 15)
    duration = a.duration or (20 if a.quick else 120)
    pause = a.pause if a.pause is not None else (1.0 if a.quick else 8.0)
    with tempfile.TemporaryDirectory(prefix="chaos-load-") as tmp:
        work = a.work or Path(tmp)
        result = run(concurrency, duration, a.bad_fraction, work, a.seed, pause)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if a.out:
        a.out.write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
