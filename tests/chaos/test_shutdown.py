"""Smoke size of the shutdown campaign (``bench/chaos/shutdown.py``): SIGTERM to ``lusai scp
--processes 3`` mid-stream and to a ``lusai worker`` whose grace runs out mid-job, on PostgreSQL
and Redis: associations finish, nothing half-indexed, the job in hand re-queued and analysed
once, no process left behind."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos.shutdown import run

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.network, pytest.mark.slow]


def test_shutdown_smoke(pg_url: str, redis_url: str, tmp_path: Path) -> None:  # fixtures: skip if absent
    out = run(tmp_path, quick=True, only=["scp-processes", "worker-grace-expired"])
    scp, worker = out["cases"]["scp-processes"], out["cases"]["worker-grace-expired"]
    assert scp["ok"] and scp["exit_code"] == 0 and not scp["left_running"], scp
    assert scp["success_without_row"] == scp["stored_without_row"] == 0, scp
    assert worker["ok"] and worker["job_state_at_exit"] == "queued", worker  # re-queued at once
    assert worker["results"] == 1 and not worker["left_running"], worker
    assert out["phi_hits"] == 0, out["examples"]
