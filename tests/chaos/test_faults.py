"""Smoke run of the fault campaign (bench/chaos/faults.py): the quick faults on a few cines.

kill -9 of the SCP mid C-STORE, kill -9 of the worker mid inference, and the destination PACS down
for an hour of simulated time, each on a throw-away production deployment (PostgreSQL, Redis,
``lusai scp`` and ``lusai worker``, a DCMTK storescp as the PACS). Nothing lost, nothing
duplicated. The faults that restart the shared servers, fill a tmpfs or need faketime run in the
full benchmark only (docs/reliability.md, "Faults").
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import which

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.network, pytest.mark.slow]


def test_quick_faults_lose_and_duplicate_nothing(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    from bench.chaos import faults

    which("storescp")  # skips (or fails under LUSAI_REQUIRE_EXTERNAL) without DCMTK
    out = tmp_path / "faults.json"
    code = faults.main(
        ["--quick", "--cines", "3", "--timeout", "240", "--work", str(tmp_path / "w"), "--out", str(out)]
    )
    report = json.loads(out.read_text())
    assert set(report["faults"]) == set(faults.QUICK)
    for name, fault in report["faults"].items():
        assert fault["ok"], (name, fault)
        assert fault["lost_objects"] == 0 and fault["duplicate_results"] == 0, (name, fault)
        assert fault["outputs_arrived"] == fault["outputs"] >= 2 * fault["accepted"] > 0, (name, fault)
        assert fault["recovery_s"] is not None, (name, fault)
    scp = report["faults"]["scp_kill"]
    assert scp["first_status"] != 0 and scp["indexed_after_kill"] == 0 and scp["temp_files_left"] == 0
    assert report["faults"]["pacs_down"]["dead_during_outage"] == 0
    assert report["phi_log_lines"] == 0
    assert code == 0
