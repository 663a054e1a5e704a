"""Receipt to PACS: from the last byte of a cine's C-STORE to its SEG and SR stored at the PACS.

    .venv/bin/python bench/e2e.py [--mode embedded|production|both] [--quick] [--out bench-e2e.json]
        [--cines 50] [--frames 100] [--rows 600] [--cols 800] [--timeout 600] [--warmup 1]

One phantom cine (the project's lung phantom, so the model finds lung; JPEG Baseline
YBR_FULL_422) is rendered once; each send is a copy with fresh Study, Series and SOP Instance
UIDs. The cines go ONE AFTER THE OTHER: cine i+1 is sent once the SEG and the SR of cine i have
arrived at the PACS (or ``--timeout`` seconds have passed: the cine counts as lost).

Modes: ``embedded`` is ``lusai serve`` (SCP, API and its two Celery workers on SQLite and the
filesystem queue, in a temp ``LUSAI_DATA_DIR``); ``production`` is ``lusai scp`` + ``lusai worker
--queues analyze`` + ``lusai worker --queues deliver`` (docker-compose.yml's services) on a
throw-away PostgreSQL database and a Redis DB index of its own (``bench.chaos.faults.Deployment``,
with the default recovery interval and stale-job timeout). The PACS is a DCMTK storescp
(``+xa -uf``, ``LUSAI_DEFAULT_DESTINATION``). storescp writes each file in place, not atomically,
so it is started with ``--exec-on-reception``: once a file is written and closed it appends
``<epoch seconds> <file name>`` to ``arrivals.log``; that stamp is when the object is stored.

Per cine: t0 = when pynetdicom's ``send_c_store`` returns Success (the SCP has stored, indexed
and queued the cine); t1 = the later of the SEG's and the SR's arrival stamps (matched by the
source's StudyInstanceUID, read from the received file). Figures: p50/p90/p99/max of t1 - t0 per
mode, and per stage the median from the job's own records:

* ``associate``: association set-up, ``receive``: the C-STORE as the sender sees it;
* ``index``: ``Instance.received_at`` -> ``Job.enqueued_at`` (rows committed, message queued);
* ``queue_wait``: ``enqueued_at`` -> ``started_at``;
* each key of ``Job.timings_ms`` (decode, preprocess, infer, refine, score, labels ...);
* ``outputs``: ``finished_at - started_at`` less the analysis total (reading the source, building,
  validating and storing SEG/SR, the Result transaction);
* ``deliver``: ``finished_at`` -> the last SEG/SR ``Delivery.delivered_at`` (``deliver_first``: the
  first one); ``deliver_to_pacs``: ``finished_at`` -> t1.

Reference in the same run: each cine is also C-STOREd (same sender, same code) to a plain
storescp just before it goes to lusai, and ``lusai analyze --json`` is timed once on the file.
The first ``--warmup`` cines of each mode (cold: the worker loads the model) are reported apart.

Exit status 1 when a cine was refused, never arrived, or arrived more than once; a measurement,
not a pass/fail on times.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402

from tests.conftest import free_port  # noqa: E402

SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
CALLING_AE = "SCANNER"
MODES = ("embedded", "production")
#: The keys of ``Job.timings_ms`` in pipeline order (others are appended as found): the analysis,
#: then the outputs (build, validate, store: recorded by jobs since issue 13's first step).
STAGE_ORDER = (
    "decode", "preprocess", "infer", "refine", "score", "score_head", "labels", "build", "validate", "store",
)  # fmt: skip


def wait_port(port: int, timeout: float = 120, alive: Callable[[], bool] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and alive():
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port}")


# --- the cines -------------------------------------------------------------------------------------


def make_template(path: Path, frames: int, rows: int, cols: int, seed: int = 0) -> Path:
    """A phantom cine (convex probe) of ``frames`` ``rows`` x ``cols`` frames, JPEG YBR_FULL_422."""
    from tests.factories import save, us_cine
    from workers.training.phantom.scanner import make_cine

    c = make_cine(np.random.default_rng(seed), n_frames=frames, src=(rows, cols), kind="convex")
    return save(us_cine(c.frames, syntax="jpeg"), path)


@dataclass
class Copy:
    path: Path
    study_uid: str
    sop_uid: str


def fresh_copy(template: pydicom.Dataset, folder: Path, n: int) -> Copy:
    ds = template.copy()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = f"E2E{n:06d}"
    path = folder / f"cine-{n:05d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return Copy(path, str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))


@dataclass
class Store:
    status: int
    associate_ms: float
    receive_ms: float
    t0: float  # epoch seconds: send_c_store returned


def c_store(port: int, path: Path, called_ae: str, timeout: float = 120) -> Store:
    """One association, one C-STORE of ``path``, timed; status -1 when none came back."""
    from pynetdicom import AE
    from pynetdicom.sop_class import UltrasoundMultiFrameImageStorage  # type: ignore[attr-defined]

    ae = AE(ae_title=CALLING_AE)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(UltrasoundMultiFrameImageStorage, ["1.2.840.10008.1.2.4.50"])
    t = time.time()
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    t_assoc = time.time()
    if not assoc.is_established:
        return Store(-1, round((t_assoc - t) * 1000, 1), 0.0, t_assoc)
    try:
        status = assoc.send_c_store(path)
        t0 = time.time()
        code = int(status.Status) if "Status" in status else -1
    except Exception:
        t0, code = time.time(), -1
    finally:
        if assoc.is_established:
            assoc.release()
    return Store(code, round((t_assoc - t) * 1000, 1), round((t0 - t_assoc) * 1000, 1), t0)


# --- the PACS --------------------------------------------------------------------------------------


@dataclass
class Pacs:
    """A DCMTK storescp; with ``stamps``, each received file is stamped in ``arrivals.log``."""

    folder: Path
    port: int = field(default_factory=free_port)
    stamps: bool = True
    proc: subprocess.Popen[bytes] | None = None
    _offset: int = 0
    #: StudyInstanceUID -> kind (seg, sr, other) -> arrival stamps
    arrived: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    sizes: dict[str, dict[str, int]] = field(default_factory=dict)  # study -> kind -> bytes at PACS

    @property
    def log(self) -> Path:
        return self.folder.parent / f"{self.folder.name}-arrivals.log"

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        storescp = shutil.which("storescp")
        if storescp is None:
            raise RuntimeError("DCMTK storescp is needed")
        argv = [storescp, "-aet", "PACS", "+xa", "-uf", "-od", str(self.folder)]
        if self.stamps:
            argv += ["-xcr", f'echo "$(date +%s.%N) #f" >> {self.log}']
        self.proc = subprocess.Popen(
            [*argv, str(self.port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port, 30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def poll(self) -> None:
        """Read the stamps written since the last call; file each by its study and kind."""
        if not self.log.exists():
            return
        with open(self.log, "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].decode().splitlines():
            stamp, _, name = line.partition(" ")
            try:
                ds = pydicom.dcmread(self.folder / name, stop_before_pixels=True)
                study, sop_class = str(ds.StudyInstanceUID), str(ds.SOPClassUID)
            except Exception:  # stamped, so written: should not happen; counted, never matched
                study, sop_class = "unreadable", ""
            kind = "seg" if sop_class == SEG_CLASS else "sr" if sop_class.startswith(SR_PREFIX) else "other"
            self.arrived.setdefault(study, {}).setdefault(kind, []).append(float(stamp))
            with contextlib.suppress(OSError):
                self.sizes.setdefault(study, {})[kind] = (self.folder / name).stat().st_size

    def wait(self, study_uid: str, timeout: float, give_up: Callable[[], bool]) -> float | None:
        """t1, when both the SEG and the SR of ``study_uid`` have arrived; None after ``timeout``
        or once ``give_up()`` (asked every second) says they never will."""
        deadline = time.monotonic() + timeout
        asked = time.monotonic()
        while time.monotonic() < deadline:
            self.poll()
            got = self.arrived.get(study_uid, {})
            if got.get("seg") and got.get("sr"):
                return max(min(got["seg"]), min(got["sr"]))
            if time.monotonic() - asked > 1:
                asked = time.monotonic()
                with contextlib.suppress(Exception):
                    if give_up():
                        return None
            time.sleep(0.01)
        return None

    def clear(self) -> None:
        for f in self.folder.iterdir():
            with contextlib.suppress(OSError):
                f.unlink()


# --- the deployments -------------------------------------------------------------------------------


def _base_env(data: Path, pacs: Pacs) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    return env | {
        "LUSAI_DATA_DIR": str(data),
        "LUSAI_DICOM_PORT": str(free_port()),
        "LUSAI_API_PORT": str(free_port()),
        "LUSAI_API_HOST": "127.0.0.1",
        "LUSAI_ALLOWED_CALLING_AES": CALLING_AE,
        "LUSAI_DEFAULT_DESTINATION": f"PACS@127.0.0.1:{pacs.port}",
        "LUSAI_LOG_FORMAT": "json",
    }


class Setup:
    """One running lusai with its PACS: ``port`` (its SCP), ``engine`` (its database), ``close()``."""

    name: str
    port: int
    engine: Engine
    pacs: Pacs
    procs: Any

    def start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def rows(self, sql: str, **params: Any) -> list[Any]:
        with self.engine.connect() as c:
            return list(c.execute(text(sql), params).all())

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs.procs)


class Embedded(Setup):
    """``lusai serve``: SQLite and the filesystem queue under a temp data folder."""

    name = "embedded"

    def __init__(self, work: Path) -> None:
        from tests.test_production import Procs

        work.mkdir(parents=True, exist_ok=True)
        self.work = work
        self.pacs = Pacs(work / "pacs")
        self.pacs.start()
        self.env = _base_env(work / "data", self.pacs)
        self.port = int(self.env["LUSAI_DICOM_PORT"])
        self.procs = Procs(work)
        self.engine = create_engine(f"sqlite:///{work / 'data' / 'lusai.sqlite'}")

    def start(self) -> None:
        self.procs.start("serve", ["serve"], self.env)
        wait_port(self.port, 180, self.alive)

    def close(self) -> None:
        self.procs.stop_all()
        self.pacs.stop()
        self.engine.dispose()


class Production(Setup):
    """``lusai scp`` + ``lusai worker`` on PostgreSQL and Redis (``bench.chaos.faults.Deployment``)."""

    name = "production"

    def __init__(self, work: Path) -> None:
        from bench.chaos.faults import Deployment

        pacs = Pacs(work / "pacs")

        class WithStampingPacs(Deployment):
            def start_pacs(self) -> None:  # the stamping storescp instead of faults' plain one
                pacs.start()
                self.pacs_port = pacs.port

            def stop_pacs(self) -> None:
                pacs.stop()

        # The service defaults, not the chaos campaign's 2 s sweep and 30 s stale-job timeout
        # (a 100-frame cine can take longer than 30 s here: it would be analysed twice).
        self.dep = WithStampingPacs(
            work,
            {
                "LUSAI_RECOVERY_INTERVAL": "30",
                "LUSAI_STALE_JOB_AFTER": "1800",
                "LUSAI_DEFAULT_DESTINATION": f"PACS@127.0.0.1:{pacs.port}",
            },
        )
        self.pacs = pacs
        self.port = self.dep.port
        self.engine = self.dep.engine
        self.procs = self.dep.procs

    def start(self) -> None:
        self.dep.start("scp", ["scp"])
        self.dep.start("worker", ["worker", "--queues", "analyze"])  # as docker-compose.yml runs them
        self.dep.start("deliver", ["worker", "--queues", "deliver"])
        wait_port(self.port, 180, self.alive)

    def close(self) -> None:
        self.dep.close()


def servers_up() -> str | None:
    """None when PostgreSQL and Redis answer (one retry after a few seconds), else why not."""
    import redis

    from tests.conftest import PG_ADMIN_URL, REDIS_URL

    why = None
    for attempt in range(2):
        try:
            engine = create_engine(PG_ADMIN_URL)
            with engine.connect() as c:
                c.execute(text("SELECT 1"))
            engine.dispose()
            redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3).ping()
            return None
        except Exception as exc:
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
            if attempt == 0:
                time.sleep(8)  # another user may be restarting the servers
    return why


# --- the records -----------------------------------------------------------------------------------


def _epoch(value: Any) -> float | None:
    """A database timestamp as epoch seconds (SQLite gives naive UTC, maybe as text)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return float(value.timestamp())


def _ms(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round((b - a) * 1000, 1)


JOB_SQL = (
    "SELECT i.received_at, j.id, j.state, j.attempts, j.created_at, j.enqueued_at, j.started_at, "
    "j.finished_at, j.timings_ms FROM instances i JOIN jobs j ON j.instance_id = i.id "
    "WHERE i.sop_instance_uid = :u ORDER BY j.id"
)
DELIVERY_SQL = (
    "SELECT d.sop_class_uid, d.state, d.attempts, d.delivered_at FROM deliveries d "
    "JOIN results r ON r.id = d.result_id WHERE r.job_id = :j"
)


def job_records(setup: Setup, sop_uid: str, t1: float | None) -> dict[str, Any]:
    """The stages of one cine from its own rows (see the module docstring)."""
    jobs = setup.rows(JOB_SQL, u=sop_uid)
    if not jobs:
        return {"jobs": 0}
    received, job_id, state, attempts, _created, enqueued, started, finished, timings = jobs[-1]
    if isinstance(timings, str):
        timings = json.loads(timings)
    timings = dict(timings or {})
    keys = sorted(timings)
    received, enqueued, started, finished = map(_epoch, (received, enqueued, started, finished))
    deliveries = setup.rows(DELIVERY_SQL, j=job_id)
    seg_sr = [
        _epoch(at)
        for cls, _s, _a, at in deliveries
        if str(cls) == SEG_CLASS or str(cls).startswith(SR_PREFIX)
    ]
    done = [t for t in seg_sr if t is not None]
    delivered = max(done) if done and len(done) == len(seg_sr) else None
    stages: dict[str, float | None] = {
        "index": _ms(received, enqueued),
        "queue_wait": _ms(enqueued, started),
    }
    total = timings.pop("total", None)
    for key in [k for k in STAGE_ORDER if k in timings] + [k for k in timings if k not in STAGE_ORDER]:
        stages[key] = timings[key]
    run_ms = _ms(started, finished)
    stages["outputs"] = None if run_ms is None or total is None else round(run_ms - total, 1)
    stages["deliver_first"] = _ms(finished, min(done)) if done else None
    stages["deliver"] = _ms(finished, delivered)
    stages["deliver_to_pacs"] = _ms(finished, t1)
    return {
        "jobs": len(jobs),
        "job_state": str(state).rsplit(".", 1)[-1].lower(),
        "attempts": attempts,
        "analysis_total_ms": total,
        "timings_ms_keys": keys,
        "deliveries": sorted(
            f"{'seg' if c == SEG_CLASS else 'sr' if str(c).startswith(SR_PREFIX) else 'other'}:{s}:{a}"
            for c, s, a, _at in deliveries
        ),
        "stages_ms": stages,
    }


def failed(setup: Setup, sop_uid: str) -> bool:
    """The cine's job failed, or the service died: its outputs will not come."""
    if not setup.alive():
        return True
    return any(str(r[2]).lower().endswith("failed") for r in setup.rows(JOB_SQL, u=sop_uid))


# --- one mode --------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return dict.fromkeys(("p50", "p90", "p99", "max", "mean"), None)
    a = np.asarray(values, float)
    return {
        "p50": round(float(np.percentile(a, 50)), 3),
        "p90": round(float(np.percentile(a, 90)), 3),
        "p99": round(float(np.percentile(a, 99)), 3),
        "max": round(float(a.max()), 3),
        "mean": round(float(a.mean()), 3),
    }


@dataclass
class Plan:
    cines: int
    warmup: int
    timeout: float
    reference: bool
    template: Path
    work: Path


def run_mode(setup: Setup, plan: Plan, ref: Pacs | None) -> dict[str, Any]:
    template = pydicom.dcmread(plan.template)
    sends = plan.work / f"{setup.name}-cines"
    sends.mkdir(parents=True, exist_ok=True)
    t_start = time.monotonic()
    setup.start()
    out: dict[str, Any] = {"startup_s": round(time.monotonic() - t_start, 1)}
    rows: list[dict[str, Any]] = []
    lost_in_a_row = 0
    for n in range(plan.warmup + plan.cines):
        copy = fresh_copy(template, sends, n)
        row: dict[str, Any] = {"n": n - plan.warmup, "warmup": n < plan.warmup, "sop_uid": copy.sop_uid}
        if ref is not None and plan.reference:
            rs = c_store(ref.port, copy.path, "PACS")
            row["ref_storescp"] = {
                "status": rs.status,
                "associate_ms": rs.associate_ms,
                "receive_ms": rs.receive_ms,
            }
            ref.clear()
        s = c_store(setup.port, copy.path, "LUSAI")
        row |= {"status": s.status, "associate_ms": s.associate_ms, "receive_ms": s.receive_ms}
        t1 = None
        if s.status == 0:
            t1 = setup.pacs.wait(copy.study_uid, plan.timeout, partial(failed, setup, copy.sop_uid))
        row["arrived"] = t1 is not None
        row["e2e_s"] = None if t1 is None else round(t1 - s.t0, 3)
        row["_t1"] = t1
        row["_study"] = copy.study_uid
        copy.path.unlink()
        rows.append(row)
        label = f"warm-up cine {n}" if row["warmup"] else f"cine {row['n']}"
        print(
            f"  {setup.name} {label}: status {s.status}, "
            f"C-STORE {s.receive_ms:.0f} ms, receipt to PACS "
            + (f"{row['e2e_s']:.2f} s" if t1 is not None else "NEVER"),
            file=sys.stderr,
            flush=True,
        )
        lost_in_a_row = 0 if t1 is not None else lost_in_a_row + 1
        if lost_in_a_row >= 2 or not setup.alive():
            out["stopped_early"] = "two cines in a row never arrived" if lost_in_a_row >= 2 else "died"
            break
    time.sleep(1.0)  # the last delivery's row is committed after its C-STORE response
    setup.pacs.poll()
    for row in rows:
        row |= job_records(setup, row["sop_uid"], row.pop("_t1"))
        study = row.pop("_study")
        got = setup.pacs.arrived.get(study, {})
        row["pacs_copies"] = {k: len(v) for k, v in sorted(got.items())}
        row["pacs_bytes"] = dict(sorted(setup.pacs.sizes.get(study, {}).items()))
    measured = [r for r in rows if not r["warmup"]]
    arrived = [r for r in measured if r["arrived"]]
    stage_names: list[str] = []
    for r in measured:
        for k in r.get("stages_ms", {}):
            if k not in stage_names:
                stage_names.append(k)
    medians: dict[str, float | None] = {
        "associate": _median([r["associate_ms"] for r in measured]),
        "receive": _median([r["receive_ms"] for r in measured]),
    }
    for k in stage_names:
        medians[k] = _median([r["stages_ms"].get(k) for r in arrived if "stages_ms" in r])
    out |= {
        "sent": len(measured),
        "accepted": sum(1 for r in measured if r["status"] == 0),
        "arrived": len(arrived),
        "lost": len(measured) - len(arrived) + (plan.cines - len(measured)),
        "duplicates": sum(
            1 for r in rows if any(v > 1 for v in r["pacs_copies"].values()) or r.get("jobs", 0) > 1
        ),
        "max_job_attempts": max((r.get("attempts") or 0 for r in rows), default=0),
        "cold_first_cine_s": rows[0]["e2e_s"] if plan.warmup and rows else None,
        "e2e_s": percentiles([r["e2e_s"] for r in arrived]),
        "stage_medians_ms": medians,
        "timings_ms_keys": sorted({k for r in rows for k in r.get("timings_ms_keys", [])}),
        "output_to_source_size": {  # bytes stored at the PACS / the source cine's file size
            kind: _ratio(_median([r["pacs_bytes"].get(kind) for r in arrived]), plan.template.stat().st_size)
            for kind in ("seg", "sr")
        },
        "ref_storescp_receive_ms": _median(
            [r["ref_storescp"]["receive_ms"] for r in measured if "ref_storescp" in r]
        ),
        "cines": rows,
    }
    return out


def _ratio(part: float | None, whole: int) -> float | None:
    return None if part is None else round(part / whole, 4)


def _median(values: list[Any]) -> float | None:
    v = [x for x in values if x is not None]
    return round(statistics.median(v), 1) if v else None


def analyze_cli(path: Path, work: Path) -> dict[str, Any]:
    """Wall time of ``lusai analyze --json`` on one cine (process start and model load included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env["LUSAI_DATA_DIR"] = str(work / "analyze-data")
    lusai = str(Path(sys.executable).parent / "lusai")
    t = time.monotonic()
    p = subprocess.run([lusai, "analyze", "--json", str(path)], env=env, capture_output=True, timeout=1800)
    wall = time.monotonic() - t
    out: dict[str, Any] = {"rc": p.returncode, "wall_s": round(wall, 2)}
    with contextlib.suppress(Exception):
        result = json.loads(p.stdout.decode().strip().splitlines()[-1])
        out["analysis_total_ms"] = result["timings_ms"].get("total")
        out["score"] = result.get("score")
        out["gradable"] = result.get("gradable")
    if p.returncode != 0:
        out["stderr"] = p.stderr.decode(errors="replace")[-1000:]
    return out


# --- the report ------------------------------------------------------------------------------------


def summary(report: dict[str, Any]) -> str:
    s = report["settings"]
    modes = [m for m, r in report["modes"].items() if "skipped" not in r and "error" not in r]
    lines = [
        f"Receipt to PACS: {s['cines']} cines of {s['frames']} frames {s['rows']}x{s['cols']} "
        f"JPEG Baseline YBR_FULL_422 ({s['object_mb']} MB), one after the other",
        "",
        f"{'figure':<28}" + "".join(f"{m:>14}" for m in modes),
    ]

    def row(label: str, *path: str, fmt: str = "{:.2f}") -> None:
        cells = []
        for m in modes:
            v: Any = report["modes"][m]
            for key in path:
                v = v.get(key) if isinstance(v, dict) else None
            cells.append(f"{'-' if v is None else fmt.format(v):>14}")
        lines.append(f"{label:<28}" + "".join(cells))

    row("sent", "sent", fmt="{}")
    row("arrived", "arrived", fmt="{}")
    for q in ("p50", "p90", "p99", "max"):
        row(f"receipt to PACS {q} (s)", "e2e_s", q)
    row("cold first cine (s)", "cold_first_cine_s")
    row("startup (s)", "startup_s", fmt="{:.1f}")
    row("SEG size / source size", "output_to_source_size", "seg", fmt="{:.4f}")
    row("SR size / source size", "output_to_source_size", "sr", fmt="{:.4f}")
    lines.append("stage medians (ms)")
    names: list[str] = []
    for m in modes:
        names += [k for k in report["modes"][m]["stage_medians_ms"] if k not in names]
    for k in names:
        row(f"  {k}", "stage_medians_ms", k, fmt="{:.1f}")
    ref = report["reference"]
    lines.append("")
    if ref.get("storescp_receive_ms") is not None:
        lines.append(f"reference: C-STORE to plain storescp, median {ref['storescp_receive_ms']:.1f} ms")
    cli = ref.get("lusai_analyze_cli")
    if cli:
        lines.append(
            f"reference: lusai analyze --json, wall {cli['wall_s']:.1f} s "
            f"(analysis {cli.get('analysis_total_ms') or 0:.0f} ms, the rest start-up and model load)"
        )
    for m, r in report["modes"].items():
        if "skipped" in r:
            lines.append(f"{m}: skipped ({r['skipped']})")
        if "error" in r:
            lines.append(f"{m}: ERROR {r['error']}\n{r.get('logs', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=[*MODES, "both"], default="both")
    ap.add_argument("--quick", action="store_true", help="3 cines of 20 frames 300x400")
    ap.add_argument("--cines", type=int, default=None, help="measured cines per mode (50; quick 3)")
    ap.add_argument("--frames", type=int, default=None, help="frames per cine (100; quick 20)")
    ap.add_argument("--rows", type=int, default=None, help="600; quick 300")
    ap.add_argument("--cols", type=int, default=None, help="800; quick 400")
    ap.add_argument("--warmup", type=int, default=1, help="cold cines per mode, reported apart")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for one cine's SEG+SR")
    ap.add_argument("--no-reference", action="store_true", help="skip the storescp and lusai analyze runs")
    ap.add_argument("--work", type=Path, default=None, help="working folder (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the working folder (logs, PACS files)")
    ap.add_argument("--out", type=Path, default=Path("bench-e2e.json"))
    args = ap.parse_args(argv)
    cines = args.cines or (3 if args.quick else 50)
    frames = args.frames or (20 if args.quick else 100)
    rows, cols = args.rows or (300 if args.quick else 600), args.cols or (400 if args.quick else 800)
    modes = list(MODES) if args.mode == "both" else [args.mode]
    work = args.work or Path(tempfile.mkdtemp(prefix="lusai-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"rendering a {frames}-frame {rows}x{cols} phantom cine ...", file=sys.stderr, flush=True)
    template = make_template(work / "template.dcm", frames, rows, cols)
    plan = Plan(cines, args.warmup, args.timeout, not args.no_reference, template, work)
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_start": os.getloadavg()},
        "settings": {
            "modes": modes,
            "cines": cines,
            "warmup": args.warmup,
            "frames": frames,
            "rows": rows,
            "cols": cols,
            "syntax": "JPEG Baseline (1.2.840.10008.1.2.4.50) YBR_FULL_422",
            "object_mb": round(template.stat().st_size / 1e6, 2),
            "timeout_s": args.timeout,
            "sequential": True,
        },
        "modes": {},
        "reference": {},
    }
    ref: Pacs | None = None
    try:
        if plan.reference:
            ref = Pacs(work / "reference", stamps=False)
            ref.start()
        for mode in modes:
            if mode == "production" and (why := servers_up()):
                report["modes"][mode] = {"skipped": f"PostgreSQL or Redis not reachable ({why})"}
                continue
            setup: Setup | None = None
            try:
                setup = Embedded(work / mode) if mode == "embedded" else Production(work / mode)
                report["modes"][mode] = run_mode(setup, plan, ref)
            except Exception as exc:
                logs = setup.procs.logs()[-3000:] if setup is not None else ""
                report["modes"][mode] = {"error": f"{type(exc).__name__}: {exc}"[:2000], "logs": logs}
            finally:
                if setup is not None:
                    setup.close()
        if ref is not None:
            ref.stop()
            receive = [
                c["ref_storescp"]["receive_ms"]
                for m in report["modes"].values()
                for c in m.get("cines", [])
                if "ref_storescp" in c and not c["warmup"]
            ]
            report["reference"]["storescp_receive_ms"] = _median(receive)
            report["reference"]["lusai_analyze_cli"] = analyze_cli(template, work)
    finally:
        if ref is not None:
            ref.stop()
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    report["host"]["load_end"] = os.getloadavg()
    ran = [m for m in report["modes"].values() if "skipped" not in m]
    report["ok"] = bool(ran) and all(
        "error" not in m and m["lost"] == 0 and m["duplicates"] == 0 and m["accepted"] == m["sent"]
        for m in ran
    )
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(summary(report))
    print(f"\nJSON: {args.out}")
    if not ran:
        return 2
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
