"""Smoke size of the throughput benchmark (``bench/throughput.py``): two tiny phantom cines at once
through the production shape (PostgreSQL, Redis, ``lusai scp``, one analyze and one deliver
worker) to a DCMTK storescp. Checks the report's shape and that every SEG and SR arrived; no
timing is asserted (a measurement, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.throughput import main
from tests.conftest import which

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.network, pytest.mark.slow]


@pytest.mark.timeout(600)
def test_throughput_smoke(tmp_path: Path, pg_url: str, redis_url: str) -> None:
    which("storescp")
    out = tmp_path / "throughput.json"
    argv = ["--workers", "1", "--cines", "2", "--frames", "6", "--rows", "120", "--cols", "160"]
    assert main([*argv, "--timeout", "300", "--out", str(out)]) == 0
    [run] = json.loads(out.read_text())["runs"]
    assert (run["workers"], run["cines"], run["refused"], run["arrived"]) == (1, 2, 0, 2)
    assert run["cines_per_hour"] > 0 and run["scaling"] == 1.0
