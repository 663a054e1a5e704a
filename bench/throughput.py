"""Throughput: cines per hour through lusai on this box, with 1..N analyze workers.

    .venv/bin/python bench/throughput.py [--workers 1,2] [--cines 24] [--frames 100] [--rows 600]
        [--cols 800] [--timeout 900] [--out bench-throughput.json]

The production shape of ``bench/e2e.py`` (``lusai scp``, PostgreSQL, Redis, a DCMTK storescp as
PACS stamping each arrival) with ``N`` analyze worker processes (``lusai worker --queues analyze``,
as ``docker compose --scale lusai-worker=N`` runs them) and one deliver worker. The whole batch
of ``--cines`` phantom cines (JPEG Baseline YBR_FULL_422, fresh UIDs each) is C-STOREd at once,
as a ward's backlog or an archive re-run would arrive; the figure is the time from the first
C-STORE to the last SEG/SR stored at the PACS, as cines per hour. With the queue full, every
worker is busy all the time, so this is the box's capacity, not a latency.

Exit status 1 when a cine was refused or its SEG and SR did not arrive; a measurement, not a pass
or fail on times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.e2e import Production, c_store, fresh_copy, make_template, servers_up, wait_port


class Scaled(Production):
    """``Production`` with ``workers`` analyze worker processes and one deliver worker."""

    def __init__(self, work: Path, workers: int) -> None:
        super().__init__(work)
        self.workers = workers

    def start(self) -> None:
        self.dep.start("scp", ["scp"])
        for i in range(self.workers):
            self.dep.start(f"worker{i}", ["worker", "--queues", "analyze"])
        self.dep.start("deliver", ["worker", "--queues", "deliver"])
        wait_port(self.port, 180, self.alive)


def run(workers: int, cines: int, template: Path, work: Path, timeout: float) -> dict[str, Any]:
    setup = Scaled(work, workers)
    try:
        setup.start()
        warm = fresh_copy(pydicom.dcmread(template), work, 0)  # loads the model in one worker
        if c_store(setup.port, warm.path, "LUSAI").status != 0:
            return {"workers": workers, "error": "the warm-up cine was refused"}
        setup.pacs.wait(warm.study_uid, timeout, lambda: not setup.alive())
        setup.pacs.poll()
        copies = [fresh_copy(pydicom.dcmread(template), work, n) for n in range(1, cines + 1)]
        t_start = time.time()
        statuses = [c_store(setup.port, c.path, "LUSAI").status for c in copies]
        t_sent = time.time()
        arrivals: list[float | None] = []
        for c in copies:
            left = max(1.0, timeout - (time.time() - t_start))
            arrivals.append(setup.pacs.wait(c.study_uid, left, lambda: not setup.alive()))
        done = [t for t in arrivals if t is not None]
        elapsed = (max(done) - t_start) if done else None
        return {
            "workers": workers,
            "cines": cines,
            "refused": sum(1 for s in statuses if s != 0),
            "arrived": len(done),
            "send_s": round(t_sent - t_start, 2),
            "elapsed_s": None if elapsed is None else round(elapsed, 2),
            "cines_per_hour": None if not elapsed else round(len(done) * 3600 / elapsed),
            "seconds_per_cine": None if not done or elapsed is None else round(elapsed / len(done), 3),
        }
    finally:
        setup.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="1,2", help="comma list of analyze worker counts")
    ap.add_argument("--cines", type=int, default=24)
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--cols", type=int, default=800)
    ap.add_argument("--timeout", type=float, default=900, help="seconds for one batch to arrive")
    ap.add_argument("--out", type=Path, default=Path("bench-throughput.json"))
    a = ap.parse_args(argv)
    if why := servers_up():
        print(f"PostgreSQL or Redis not reachable: {why}", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="lusai-throughput-"))
    template = make_template(work / "template.dcm", a.frames, a.rows, a.cols)
    report: dict[str, Any] = {
        "started": datetime.now(UTC).isoformat(),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "settings": {"cines": a.cines, "frames": a.frames, "rows": a.rows, "cols": a.cols},
        "runs": [],
    }
    ok = True
    for n in (int(w) for w in a.workers.split(",")):
        r = run(n, a.cines, template, work / f"workers-{n}", a.timeout)
        print(json.dumps(r), file=sys.stderr, flush=True)
        report["runs"].append(r)
        ok = ok and "error" not in r and r["refused"] == 0 and r["arrived"] == a.cines
    first = report["runs"][0].get("cines_per_hour")
    for r in report["runs"]:
        r["scaling"] = (
            None if not first or not r.get("cines_per_hour") else round(r["cines_per_hour"] / first, 2)
        )
    a.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["runs"], indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
