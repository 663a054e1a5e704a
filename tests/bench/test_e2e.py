"""Smoke size of the receipt-to-PACS benchmark (``bench/e2e.py``): two tiny phantom cines through
``lusai serve`` (SQLite, filesystem queue) to a DCMTK storescp. Checks the report's shape and that
every cine's SEG and SR arrived exactly once; no timing is asserted (a measurement, not a test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.e2e import main
from tests.conftest import which

pytestmark = [pytest.mark.network, pytest.mark.slow]

STAGES = {"associate", "receive", "index", "queue_wait", "decode", "infer", "outputs", "deliver"}


@pytest.mark.timeout(600)
def test_e2e_quick_embedded(tmp_path: Path) -> None:
    which("storescp")
    out = tmp_path / "e2e.json"
    argv = ["--quick", "--mode", "embedded", "--cines", "2", "--frames", "6", "--rows", "120"]
    argv += ["--cols", "160", "--warmup", "0", "--work", str(tmp_path / "work"), "--out", str(out)]
    assert main(argv) == 0
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert report["settings"]["cines"] == 2 and report["settings"]["sequential"] is True
    mode = report["modes"]["embedded"]
    counts = [mode[k] for k in ("sent", "accepted", "arrived", "lost", "duplicates")]
    assert counts == [2, 2, 2, 0, 0], mode
    assert set(mode["e2e_s"]) == {"p50", "p90", "p99", "max", "mean"}
    assert all(mode["e2e_s"][q] is not None for q in ("p50", "p90", "p99", "max"))
    assert set(mode["stage_medians_ms"]) >= STAGES, mode["stage_medians_ms"]
    assert {"decode", "infer", "total"} <= set(mode["timings_ms_keys"])
    for cine in mode["cines"]:
        assert cine["arrived"] and cine["status"] == 0 and cine["job_state"] == "succeeded", cine
        assert cine["pacs_copies"] == {"seg": 1, "sr": 1}, cine
        assert sorted(cine["deliveries"]) == ["seg:delivered:1", "sr:delivered:1"], cine
        assert cine["e2e_s"] is not None and cine["ref_storescp"]["status"] == 0
    cli = report["reference"]["lusai_analyze_cli"]
    assert cli["rc"] == 0 and cli["wall_s"] is not None, cli
    assert report["reference"]["storescp_receive_ms"] is not None
