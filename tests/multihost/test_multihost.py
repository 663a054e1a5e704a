"""lusai across hosts that fail: bench/multihost.py as a test (``make multihost``; root, ~4 min,
so not in the default run).

The SCP, the API, three workers, PostgreSQL/Redis and the PACS each on a host of their own
(network and UTS namespaces on a private bridge); one worker's link is cut mid-job, another is
killed, Redis restarts; every cine of two 30-cine bursts must be analysed and delivered exactly
once. Its fault table: docs/deployment.md, "Across hosts".
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, missing

pytestmark = [pytest.mark.multihost, pytest.mark.slow, pytest.mark.network]


def test_a_burst_survives_a_cut_link_a_killed_worker_and_a_redis_restart() -> None:
    if os.geteuid() != 0:
        missing("root (network namespaces)")
    for tool in ("ip", "unshare", "runuser", "redis-server", "redis-cli", "storescp"):
        if shutil.which(tool) is None:
            missing(tool)
    if not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")):
        missing("PostgreSQL's server binaries")
    out = REPO / "bench" / "results" / "multihost.json"
    run = subprocess.run(
        [sys.executable, str(REPO / "bench" / "multihost.py"), "--cines", "30", "--cut-seconds", "30",
         "--timeout", "300", "--out", str(out)],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["problems"] == [], json.dumps(result, indent=1)[:6000]
    assert run.returncode == 0
    books = result["books"]
    assert books["accepted"] == 60 and books["outputs_arrived"] == books["outputs"] == 120
    faults = result["faults"]
    assert faults["link_cut"]["jobs_hit"] and faults["worker_kill"]["jobs_hit"]
    # the cut worker's job was done elsewhere before its link came back
    assert faults["link_cut"]["seconds_to_recover"] < faults["link_cut"]["link_down_seconds"]
