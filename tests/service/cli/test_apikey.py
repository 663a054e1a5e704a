"""``lusai apikey``: the token printed once works against the API, list hides secrets, revoke bites."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.service.api.conftest import make_sqlite_api


def test_create_list_revoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> None:
    gen = make_sqlite_api(sqlite_template, tmp_path, monkeypatch, api_key_cache_seconds=0)
    api = next(gen)
    runner = CliRunner()
    out = runner.invoke(app, ["apikey", "create", "ICU dashboard", "-s", "read", "--rate-limit", "0"])
    assert out.exit_code == 0, out.output
    token = out.output.strip().splitlines()[-1]
    assert token.startswith("lusai_")
    key_id = token.split("_")[1]
    assert api.client.get("/api/v1/studies", headers={"X-API-Key": token}).status_code == 200
    assert api.client.post("/api/v1/jobs/1/cancel", headers={"X-API-Key": token}).status_code == 403
    listed = runner.invoke(app, ["apikey", "list"])
    assert listed.exit_code == 0 and key_id in listed.output and "ICU dashboard" in listed.output
    assert token.split("_", 2)[2] not in listed.output
    assert runner.invoke(app, ["apikey", "revoke", key_id]).exit_code == 0
    assert api.client.get("/api/v1/studies", headers={"X-API-Key": token}).status_code == 401
    assert runner.invoke(app, ["apikey", "revoke", "000000000000"]).exit_code == 1
    bad = runner.invoke(app, ["apikey", "create", "x", "-s", "superuser"])
    assert bad.exit_code == 2
    gen.close()
