"""Authentication, scopes, rate limits, CORS, request IDs, audit and error documents."""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, text

from service.api.auth import create_api_key, split_token
from service.core.models import ApiKey, AuditEvent
from tests.service.api.conftest import Api, make_sqlite_api, seed_study

PROBLEM = "application/problem+json"


def _problem(resp: Any, status: int, slug: str) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status
    assert body["type"] == f"urn:lusai:problem:{slug}"
    assert body["request_id"] == resp.headers["x-request-id"]
    return body


def test_no_anonymous_access_except_health(sqlite_api: Api) -> None:
    c = sqlite_api.client
    for url in ("/api/v1/studies", "/api/v1/results", "/api/v1/jobs", "/api/v1/deliveries", "/api/v1/audit"):
        body = _problem(c.get(url), 401, "unauthorized")
        assert body["instance"] == url
    assert c.get("/api/v1/studies").headers["www-authenticate"].startswith("Bearer")
    assert c.get("/health/live").status_code == 200
    assert c.get("/health").status_code in (200, 503)  # readiness depends on the broker, not on auth
    assert c.get("/metrics").status_code == 200


def test_bad_keys_are_rejected(sqlite_api: Api) -> None:
    c = sqlite_api.client
    good = sqlite_api.tokens["read"]
    key_id, _secret = split_token(good) or ("", "")
    for token in ("nonsense", "lusai_short_x", f"lusai_{key_id}_wrongsecret", good + "x"):
        _problem(c.get("/api/v1/studies", headers={"X-API-Key": token}), 401, "unauthorized")
    assert c.get("/api/v1/studies", headers={"X-API-Key": good}).status_code == 200
    assert c.get("/api/v1/studies", headers={"Authorization": f"Bearer {good}"}).status_code == 200


def test_keys_are_hashed_at_rest(sqlite_api: Api) -> None:
    with sqlite_api.session() as s:
        rows = list(s.scalars(select(ApiKey)))
    assert len(rows) == 3
    for token in sqlite_api.tokens.values():
        _key_id, secret = split_token(token) or ("", "")
        assert all(secret not in (r.secret_sha256, r.key_id, r.name) for r in rows)


def test_revoked_and_expired_keys(sqlite_api: Api) -> None:
    with sqlite_api.session() as s:
        revoked, t1 = create_api_key(s, "old", ["read"])
        revoked.revoked_at = datetime.now(UTC)
        _expired, t2 = create_api_key(
            s, "temp", ["read"], expires_at=datetime.now(UTC) - timedelta(minutes=1)
        )
    for token in (t1, t2):
        _problem(sqlite_api.client.get("/api/v1/studies", headers={"X-API-Key": token}), 401, "unauthorized")


def test_scopes(sqlite_api: Api, tmp_path: Path) -> None:
    seeded = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 1)], with_seg=False)
    uid = seeded.sop_uids[0]
    _problem(sqlite_api.post(f"/api/v1/instances/{uid}/jobs", scope="read", json={}), 403, "forbidden")
    _problem(sqlite_api.get("/api/v1/audit", scope="write"), 403, "forbidden")
    assert sqlite_api.post(f"/api/v1/instances/{uid}/jobs", scope="write", json={}).status_code == 202
    assert sqlite_api.get("/api/v1/audit", scope="admin").status_code == 200
    assert sqlite_api.get("/api/v1/studies", scope="admin").status_code == 200  # admin implies read


def test_rate_limit_per_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> None:
    gen = make_sqlite_api(sqlite_template, tmp_path, monkeypatch, api_rate_burst=3)
    api = next(gen)
    with api.session() as s:
        _row, limited = create_api_key(s, "dashboard", ["read"], rate_limit=60)
    h = {"X-API-Key": limited}
    statuses = [api.client.get("/api/v1/studies", headers=h) for _ in range(4)]
    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]
    assert statuses[0].headers["ratelimit-limit"] == "60"
    body = _problem(statuses[3], 429, "rate-limited")
    assert "60" in body["detail"]
    assert int(statuses[3].headers["retry-after"]) >= 1
    # other keys have their own bucket
    assert api.get("/api/v1/studies").status_code == 200
    gen.close()


def test_cors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> None:
    gen = make_sqlite_api(sqlite_template, tmp_path, monkeypatch, cors_origins="https://dash.example")
    api = next(gen)
    pre = {"Origin": "https://dash.example", "Access-Control-Request-Method": "GET",
           "Access-Control-Request-Headers": "X-API-Key"}  # fmt: skip
    r = api.client.options("/api/v1/studies", headers=pre)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "https://dash.example"
    r = api.client.options("/api/v1/studies", headers={**pre, "Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers
    r = api.get("/api/v1/studies", headers={"Origin": "https://dash.example"})
    assert r.headers["access-control-allow-origin"] == "https://dash.example"
    assert "x-request-id" in r.headers["access-control-expose-headers"].lower()
    gen.close()


def test_request_ids(sqlite_api: Api) -> None:
    r = sqlite_api.get("/api/v1/studies", headers={"X-Request-ID": "dash-42.a"})
    assert r.headers["x-request-id"] == "dash-42.a"
    r = sqlite_api.get("/api/v1/studies", headers={"X-Request-ID": "bad id\nwith newline"})
    assert r.headers["x-request-id"] != "bad id\nwith newline" and len(r.headers["x-request-id"]) == 32
    assert sqlite_api.client.get("/health/live").headers["x-request-id"]


def test_audit_without_phi(sqlite_api: Api, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    seeded = seed_study(
        sqlite_api, tmp_path, zones=[("LUS R1", 2)], patient_id="SECRET-PAT-77", with_seg=False
    )
    caplog.set_level(logging.DEBUG)
    r = sqlite_api.get("/api/v1/studies", params={"patient_id": "SECRET-PAT-77"})
    assert r.json()["items"][0]["patient_id"] == "SECRET-PAT-77"
    sqlite_api.get(f"/api/v1/studies/{seeded.study_uid}", headers={"X-Request-ID": "req-1"})
    sqlite_api.get("/api/v1/studies/1.2.3.999")  # a 404 is an access attempt too
    with sqlite_api.session() as s:
        events = list(s.scalars(select(AuditEvent).order_by(AuditEvent.id)))
    assert [(e.route, e.status) for e in events] == [
        ("/api/v1/studies", 200),
        ("/api/v1/studies/{study_instance_uid}", 200),
        ("/api/v1/studies/{study_instance_uid}", 404),
    ]
    first, second, _ = events
    assert first.principal.startswith("key:") and first.principal.endswith(":test-read")
    assert first.auth_method == "api-key" and first.action == "GET" and first.query_keys == "patient_id"
    assert second.resource == f"/api/v1/studies/{seeded.study_uid}" and second.request_id == "req-1"
    assert first.at.replace(tzinfo=UTC) > datetime.now(UTC) - timedelta(minutes=1)
    dumped = json.dumps(
        [{c.name: str(getattr(e, c.name)) for c in AuditEvent.__table__.columns} for e in events]
    )
    assert "SECRET-PAT-77" not in dumped
    server_log = "\n".join(
        r.getMessage() + str(getattr(r, "ctx", "")) for r in caplog.records if r.name != "httpx"
    )
    assert "SECRET-PAT-77" not in server_log  # (httpx is the test client logging its own URLs)
    # health and failed authentication are not audited as data access
    sqlite_api.client.get("/health/live")
    sqlite_api.client.get("/api/v1/studies")
    with sqlite_api.session() as s:
        assert len(list(s.scalars(select(AuditEvent)))) == 3


def test_audit_failure_withholds_data(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], patient_id="SECRET-PAT-88", with_seg=False)
    before = _audit_failures(sqlite_api)  # a process-wide counter: other tests count too
    with sqlite_api.session() as s:
        s.execute(text("DROP TABLE audit_events"))  # the audit log cannot be written any more
    r = sqlite_api.get("/api/v1/studies")
    _problem(r, 503, "audit-unavailable")
    assert "SECRET-PAT-88" not in r.text
    assert _audit_failures(sqlite_api) == before + 1


def _audit_failures(api: Api) -> float:
    """lusai_audit_write_failures_total as /metrics shows it (0 before the first failure)."""
    for line in api.client.get("/metrics").text.splitlines():
        if line.startswith("lusai_audit_write_failures_total "):
            return float(line.split()[1])
    return 0.0


def test_concurrent_requests_are_all_audited(api: Api, tmp_path: Path) -> None:
    """Group commit: rows queued while a batch commits go in the next one, none is lost."""
    import asyncio

    import httpx

    seed_study(api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)

    async def burst() -> list[int]:
        transport = httpx.ASGITransport(app=api.client.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", headers=api.headers()) as c:
            rs = await asyncio.gather(
                *(c.get("/api/v1/results", headers={"X-Request-ID": f"b{i}"}) for i in range(40))
            )
        return [r.status_code for r in rs]

    assert asyncio.run(burst()) == [200] * 40
    with api.session() as s:
        ids = set(s.scalars(select(AuditEvent.request_id)))
    assert {f"b{i}" for i in range(40)} <= ids


def test_unexpected_error_is_an_opaque_problem(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from service.api.routes import studies

    def boom(*_a: Any) -> Any:
        raise RuntimeError("patient SECRET-PAT-99 broke it")

    monkeypatch.setattr(studies, "study_counts", boom)
    caplog.set_level(logging.DEBUG)
    r = sqlite_api.get("/api/v1/studies")
    body = _problem(r, 500, "internal-error")
    assert "SECRET" not in r.text and body["detail"]
    server_log = "\n".join(
        r.getMessage() + str(getattr(r, "ctx", "")) for r in caplog.records if r.name != "httpx"
    )
    assert "RuntimeError" in server_log and "SECRET-PAT-99" not in server_log


def test_validation_errors_are_problems_without_input(sqlite_api: Api) -> None:
    r = sqlite_api.get("/api/v1/results", params={"score_min": "SECRET-99"})
    body = _problem(r, 422, "validation-error")
    assert body["errors"][0]["loc"] == ["query", "score_min"]
    assert "SECRET-99" not in r.text
    _problem(sqlite_api.get("/api/v1/studies/not-a-uid"), 422, "validation-error")
    _problem(sqlite_api.get("/api/v1/nowhere"), 404, "not-found")


# --- OIDC ---------------------------------------------------------------------------------------


@pytest.fixture
def oidc(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> Any:

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", use="sig", alg="RS256")
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk]}))
    gen = make_sqlite_api(
        sqlite_template,
        tmp_path,
        monkeypatch,
        oidc_issuer="https://idp.example/realms/hospital",
        oidc_audience="lusai",
        oidc_jwks_file=str(jwks),
    )
    api = next(gen)

    def token(signer: Any = key, **claims: Any) -> str:
        now = int(time.time())
        base = {"iss": "https://idp.example/realms/hospital", "aud": "lusai", "sub": "nurse-7", "iat": now,
                "exp": now + 300, "scope": "openid lusai:read"}  # fmt: skip
        base.update(claims)
        return jwt.encode({k: v for k, v in base.items() if v is not None}, signer, algorithm="RS256",
                          headers={"kid": "k1"})  # fmt: skip

    yield api, token, other
    gen.close()


def test_oidc_tokens(oidc: Any, tmp_path: Path) -> None:
    api, token, other = oidc
    c = api.client

    def get(t: str) -> Any:
        return c.get("/api/v1/studies", headers={"Authorization": f"Bearer {t}"})

    assert get(token()).status_code == 200
    for bad in (
        token(aud="other"),
        token(iss="https://evil.example"),
        token(exp=int(time.time()) - 3600),
        token(signer=other),
        token(sub=None),
    ):
        _problem(get(bad), 401, "unauthorized")
    _problem(get(token(scope="openid")), 403, "forbidden")  # valid, but no lusai scope
    seeded = seed_study(api, tmp_path, zones=[("LUS R1", 1)], with_seg=False)
    url = f"/api/v1/instances/{seeded.sop_uids[0]}/jobs"
    _problem(c.post(url, json={}, headers={"Authorization": f"Bearer {token()}"}), 403, "forbidden")
    ok = c.post(url, json={}, headers={"Authorization": f"Bearer {token(scope=['lusai:write'])}"})
    assert ok.status_code == 202
    with api.session() as s:
        principals = {e.principal for e in s.scalars(select(AuditEvent))}
    assert "oidc:nurse-7" in principals
    # a JWT is not accepted in X-API-Key (that header is for lusai keys only)
    _problem(c.get("/api/v1/studies", headers={"X-API-Key": token()}), 401, "unauthorized")


def test_audit_log_endpoint(sqlite_api: Api, tmp_path: Path) -> None:
    seeded = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    sqlite_api.get(f"/api/v1/studies/{seeded.study_uid}")
    sqlite_api.get("/api/v1/results", scope="write")
    body = sqlite_api.get(
        "/api/v1/audit", scope="admin", params={"resource_prefix": f"/api/v1/studies/{seeded.study_uid}"}
    ).json()
    assert [(e["action"], e["status"], e["principal"].endswith("test-read")) for e in body["items"]] == [
        ("GET", 200, True)
    ]
    writer = sqlite_api.get("/api/v1/audit", scope="admin", params={"principal": "nobody"}).json()
    assert writer["items"] == []
    page = sqlite_api.get("/api/v1/audit", scope="admin", params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["next_cursor"]
    # the audit query itself is audited
    assert page["items"][0]["route"] == "/api/v1/audit"


def test_anonymous_read_when_keys_not_required(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path
) -> None:
    gen = make_sqlite_api(sqlite_template, tmp_path, monkeypatch, api_keys_required="false")
    api = next(gen)
    assert api.client.get("/api/v1/studies").status_code == 200
    _problem(api.client.post("/api/v1/jobs/1/cancel"), 403, "forbidden")
    _problem(api.client.get("/api/v1/studies", headers={"X-API-Key": "lusai_bad"}), 401, "unauthorized")
    with api.session() as s:
        assert {e.principal for e in s.scalars(select(AuditEvent))} == {"anonymous"}
    gen.close()


def test_nul_in_url_is_a_bad_request_not_an_outage(api: Api) -> None:
    """A NUL byte (``%00``) in a path or query parameter: 400, never a 500 from the database
    (PostgreSQL refuses NUL in text) nor a 503 from an audit row it cannot store; other requests,
    and the audit log, carry on (issue 12, security campaign)."""
    for url in (
        "/api/v1/studies?patient_id=1%00",
        "/api/v1/instances?accession_number=%00",
        "/api/v1/studies/1%00",
        "/api/v1/instances/1.2.3%00/result",
        "/api/v1/results/1%00/seg",
    ):
        _problem(api.get(url), 400, "bad-request")
    _problem(api.client.get("/api/v1/studies/1%00"), 400, "bad-request")  # without a key too
    assert api.get("/api/v1/studies?patient_id=x").status_code == 200
    with api.session() as s:
        assert [e.status for e in s.scalars(select(AuditEvent))][-1] == 200
