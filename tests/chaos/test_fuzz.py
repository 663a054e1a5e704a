"""Smoke version of the fuzz campaign (``bench/chaos/fuzz.py``): the mutators, then a short real run.

The full run (10,000 mutants through the SCP, 2,000 over REST) is a benchmark; its figures are in
docs/reliability.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.chaos.mutate import KINDS, PHI_NAME, make

REPO = Path(__file__).resolve().parents[2]


def test_every_kind_is_deterministic_and_labelled() -> None:
    for i, kind in enumerate(KINDS):
        a, b = make(3, i, kind), make(3, i, kind)
        assert a.kind == kind and a.family == KINDS[kind][0]
        assert a.data == b.data and a.sop_instance_uid == b.sop_instance_uid
        wire = a.wire()
        assert wire[128:132] == b"DICM", kind  # pynetdicom can read the meta of whatever goes out
    assert make(3, 7).data == make(3, 7).data and make(3, 7).data != make(4, 7).data


def test_mutants_carry_phi_markers_and_differ_from_the_seed() -> None:
    valid = make(5, 0, "valid")
    assert PHI_NAME.encode() in valid.data
    for kind in ("truncated", "wrong-vr", "encaps-bot-lies", "jpeg-flip-scan", "frames-lie"):
        assert make(5, 0, kind).data != valid.data, kind


@pytest.mark.network
@pytest.mark.slow
def test_a_short_fuzz_run_meets_every_zero_target(tmp_path: Path) -> None:
    out = tmp_path / "fuzz.json"
    run = subprocess.run(
        [sys.executable, "bench/chaos/fuzz.py", "--count", "40", "--rest", "12", "--senders", "2",
         "--worker-timeout", "240", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=290,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["sent"] == {"scp": 40, "rest": 12} and r["failures"] == []
    assert r["crashes"] == {} and r["hung"] == 0 and r["rest_5xx"] == 0 and r["logs"]["phi_hits"] == 0
    assert r["storage"]["stored_not_indexed"] == 0 and r["storage"]["indexed_not_stored"] == 0
    assert r["jobs"]["not_ended_cleanly"] == 0 and r["jobs_open_at_end"] == 0
    assert sum(r["codes"].values()) == 52
