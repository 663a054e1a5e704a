"""Smoke size of the security campaign (``bench/chaos/security.py``): calling-AE allow-list,
mutual TLS, API keys, path traversal (a subset of the payloads), oversize uploads and the PHI log
scan, against running ``lusai scp``/``api``/``worker`` processes on PostgreSQL and Redis."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos.security import run

pytestmark = [pytest.mark.postgres, pytest.mark.redis, pytest.mark.network, pytest.mark.slow]


def test_security_smoke(pg_url: str, redis_url: str, tmp_path: Path) -> None:  # fixtures: skip if absent
    out = run(tmp_path, quick=True, extra_logs=[])
    results = {c["check"]: c["result"] for c in out["checks"]}
    assert results == {
        "unknown_calling_ae": "PASS",
        "tls_wrong_client_certificate": "PASS",
        "api_without_key": "PASS",
        "path_traversal": "PASS",
        "oversize_upload": "PASS",
        "phi_in_logs": "PASS",
        "processes_alive": "PASS",
    }, [c for c in out["checks"] if c["result"] != "PASS"]
