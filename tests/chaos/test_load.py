"""Smoke size of the load campaign (``bench/chaos/load.py``): a few senders for a few seconds
against ``lusai scp`` + ``lusai worker`` on PostgreSQL and Redis, every target checked."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos.load import run

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.network, pytest.mark.slow]


def test_load_smoke(pg_url: str, redis_url: str, tmp_path: Path) -> None:  # fixtures: skip if absent
    out = run(concurrency=3, duration=8, bad_fraction=0.3, work=tmp_path, seed=1, pause=0.3)
    assert out["valid_sent"] > 0 and out["bad_sent"] > 0, out
    assert out["acceptance_rate_valid"] == 1.0, out["valid_outcomes"]
    assert out["bad_accepted"] == 0 and out["bad_objects_indexed"] == 0, out["bad_refused_by_status"]
    assert out["lost"] == 0 and out["valid_not_analysed_exactly_once"] == 0, out
    assert all(out["processes_alive_at_end"].values())
    assert out["log_lines_scanned"] > 0 and out["phi_hits"] == 0, out["examples"]
