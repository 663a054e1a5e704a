"""Worker time per job: what one analysis costs beyond the network, stage by stage.

    .venv/bin/python bench/jobcost.py [--frames 6] [--jobs 12] [--raw] [--rows R --cols C]
        [--out bench-jobcost.json]

Runs the worker's own tasks in this process, as a pool process would (``workers.tasks.analyze``,
then ``workers.tasks.previews``), on phantom cines (JPEG Baseline YBR_FULL_422 by default) of
``--frames`` frames received through the ingest path into a throw-away embedded deployment
(SQLite, filesystem queue). Each job's stages come from the job's own ``timings_ms``: the
analysis (decode ... labels, ``total``), then ``build``, ``validate`` and ``store`` of the SEG and
SR. Worker time per job is this process's CPU time plus its children's (the dicom3tools
validators run as subprocesses), so a check moved into a subprocess is not hidden. The first job
(model load, imports) is reported apart. ``fixed_cost_wall_ms`` is the analyze task's time less
the analysis stages (claim, read, build, validate, store, database): issue 13 aims at <= 150 ms
of worker time for a 6-frame cine. With ``--rows``/``--cols`` the phantom is rendered at that size
(JPEG only; default 300 x 320). Also reported: the stored SEG and SR sizes over the source's
(``output_to_source_size``) and this process's peak RSS (``peak_rss_mb``: the worker's, as the
phantoms are rendered in a child process; ``--frames 1000 --rows 768 --cols 1024 --jobs 1`` for
issue 13's long cine).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _cpu_s() -> float:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _cine(path: Path, frames: int, jpeg: bool, seed: int, size: tuple[int, int] | None) -> Path:
    from tests.factories import phantom_cine_file

    if size is None:
        return phantom_cine_file(path, frames=frames, jpeg=jpeg, seed=seed)
    from bench.e2e import make_template

    return make_template(path, frames, *size, seed=seed)


def run(frames: int, jobs: int, jpeg: bool, size: tuple[int, int] | None = None) -> dict[str, Any]:
    data = Path(tempfile.mkdtemp(prefix="lusai-jobcost-"))
    os.environ["LUSAI_DATA_DIR"] = str(data)
    for var in ("LUSAI_DATABASE_URL", "LUSAI_BROKER_URL", "LUSAI_STORAGE_ROOT"):
        os.environ.pop(var, None)
    from migrations.runner import upgrade
    from service.core.ingest import ingest_file
    from service.core.models import Job, Result
    from service.core.settings import Settings
    from workers import tasks
    from workers.celery_app import LusaiTask, WorkerRuntime

    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    runtime = LusaiTask.use(WorkerRuntime.from_settings(settings))
    rows: list[dict[str, Any]] = []
    rss_analyze = 0  # KiB: the peak RSS once the last analyze task has returned (before previews)
    for i in range(jobs + 1):  # +1: the cold first job
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # the phantom's memory is not ours
            cine = pool.apply(_cine, (data / f"cine{i}.dcm", frames, jpeg, i, size))
        source_bytes = cine.stat().st_size
        tmp = runtime.store.new_temp()
        tmp.write_bytes(cine.read_bytes())
        outcome = ingest_file(tmp, calling_ae=None, runtime=runtime)
        assert outcome.job_id is not None, outcome
        cpu0, t0 = _cpu_s(), time.perf_counter()
        state = tasks.analyze(outcome.job_id)
        cpu1, t1 = _cpu_s(), time.perf_counter()
        rss_analyze = max(rss_analyze, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
        with runtime.db.session() as session:
            job = session.get(Job, outcome.job_id)
            assert job is not None and job.result is not None, state
            timings, result_id = dict(job.timings_ms), job.result.id
            result = session.get(Result, result_id)
            assert result is not None
            keys = {"seg": result.seg_storage_key, "sr": result.sr_storage_key}
        sizes = {k: runtime.store.path(v).stat().st_size for k, v in keys.items() if v}
        previews = tasks.previews(result_id)
        cpu2, t2 = _cpu_s(), time.perf_counter()
        rows.append(
            {
                "state": state,
                "previews": previews,
                "analyze_wall_ms": round((t1 - t0) * 1000, 1),
                "analyze_cpu_ms": round((cpu1 - cpu0) * 1000, 1),
                "previews_wall_ms": round((t2 - t1) * 1000, 1),
                "previews_cpu_ms": round((cpu2 - cpu1) * 1000, 1),
                "timings_ms": timings,
                "source_bytes": source_bytes,
                "output_bytes": sizes,
            }
        )
    LusaiTask.release()
    shutil.rmtree(data, ignore_errors=True)
    warm = rows[1:]
    stages = sorted({k for r in warm for k in r["timings_ms"]})

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 1)

    wall_ms = med([r["analyze_wall_ms"] for r in warm])
    analysis_ms = med([r["timings_ms"].get("total", 0.0) for r in warm])
    ratios = {
        kind: round(statistics.median([r["output_bytes"][kind] / r["source_bytes"] for r in rows]), 4)
        for kind in ("seg", "sr")
    }
    return {
        "frames": frames,
        "size": list(size) if size else [300, 320],
        "jobs": jobs,
        "syntax": "jpeg-ybr422" if jpeg else "raw-mono",
        "cold_first_job": rows[0],
        "stage_median_ms": {k: med([r["timings_ms"].get(k, 0.0) for r in warm]) for k in stages},
        "analyze_wall_median_ms": wall_ms,
        "analyze_cpu_median_ms": med([r["analyze_cpu_ms"] for r in warm]),
        "previews_wall_median_ms": med([r["previews_wall_ms"] for r in warm]),
        "previews_cpu_median_ms": med([r["previews_cpu_ms"] for r in warm]),
        # everything the analyze task spends outside the analysis itself (claim, read, build,
        # validate, store, database): the cost every job pays whatever its size
        "fixed_cost_wall_ms": round(wall_ms - analysis_ms, 1),
        "aim_fixed_cost_ms": 150,
        "output_to_source_size": ratios,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_analyze_mb": round(rss_analyze / 1024, 1),
        "jobs_detail": warm,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=6)
    ap.add_argument("--jobs", type=int, default=12, help="warm jobs measured (after one cold job)")
    ap.add_argument("--raw", action="store_true", help="uncompressed MONOCHROME2 instead of JPEG YBR")
    ap.add_argument("--rows", type=int, default=None, help="phantom rows (with --cols; JPEG only)")
    ap.add_argument("--cols", type=int, default=None)
    ap.add_argument("--out", type=Path, default=Path("bench-jobcost.json"))
    a = ap.parse_args(argv)
    if (a.rows is None) != (a.cols is None) or (a.rows is not None and a.raw):
        ap.error("--rows and --cols go together, and with a JPEG cine")
    report = run(a.frames, a.jobs, not a.raw, (a.rows, a.cols) if a.rows is not None else None)
    a.out.write_text(json.dumps(report, indent=2))
    summary = {k: v for k, v in report.items() if k not in ("jobs_detail", "cold_first_job")}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
