"""Smoke size of the worker-time benchmark (``bench/jobcost.py``): the tasks run, every stage is
reported; no timing is asserted (a measurement, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.jobcost import main


def test_jobcost_reports_every_stage_of_a_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUSAI_DATA_DIR", str(tmp_path / "unused"))  # restored afterwards
    for var in ("LUSAI_DATABASE_URL", "LUSAI_BROKER_URL", "LUSAI_STORAGE_ROOT"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "jobcost.json"
    assert main(["--jobs", "1", "--frames", "4", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    [job] = report["jobs_detail"]
    assert (job["state"], job["previews"]) == ("succeeded", "stored")
    assert {"decode", "infer", "total", "build", "validate", "store"} <= set(report["stage_median_ms"])
    assert report["fixed_cost_wall_ms"] > 0 and report["aim_fixed_cost_ms"] == 150
    assert report["output_to_source_size"]["sr"] > 0 and report["output_to_source_size"]["seg"] > 0
    assert report["peak_rss_mb"] > 0
