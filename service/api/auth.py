"""Who is calling: API keys (hashed at rest) and optional OIDC bearer tokens, scopes, rate limits.

API keys look like ``lusai_<key id>_<secret>``. The key ID is public and indexes the row; only the
SHA-256 of the secret is stored, compared in constant time. Verified keys are cached for
``LUSAI_API_KEY_CACHE_SECONDS`` so a busy dashboard costs no database round trip per request; that
is also the longest a revoked key keeps working in a running process.

OIDC tokens are verified offline against a JWKS file (hospital networks rarely let the API reach
the identity provider), with issuer, audience and expiry required.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import ApiKey
from service.core.settings import Settings

SCOPES = ("read", "write", "admin")
TOKEN_PREFIX = "lusai_"
AuthMethod = Literal["api-key", "oidc", "anonymous"]


def expand_scopes(scopes: Iterable[str]) -> frozenset[str]:
    """admin implies write implies read, so a check names only the least scope it needs."""
    got = set(scopes)
    if "admin" in got:
        got |= {"write", "read"}
    if "write" in got:
        got.add("read")
    return frozenset(got & set(SCOPES))


@dataclass(frozen=True)
class Principal:
    """The authenticated caller; ``name`` goes into the audit log (never a patient identifier)."""

    name: str
    method: AuthMethod
    scopes: frozenset[str]
    rate_limit: int | None = None  # requests per minute; None: the default

    def has(self, scope: str) -> bool:
        return scope in self.scopes


# --- API keys -----------------------------------------------------------------------------------


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str, str]:
    """(key_id, secret, token): the token is shown once and never stored."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    return key_id, secret, f"{TOKEN_PREFIX}{key_id}_{secret}"


def split_token(token: str) -> tuple[str, str] | None:
    if not token.startswith(TOKEN_PREFIX):
        return None
    key_id, sep, secret = token[len(TOKEN_PREFIX) :].partition("_")
    if not sep or len(key_id) != 12 or not secret:
        return None
    return key_id, secret


def create_api_key(
    session: Session,
    name: str,
    scopes: Iterable[str],
    *,
    rate_limit: int | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Insert a key; returns the row and the token to hand to the integrator (shown once)."""
    scopes = sorted(set(scopes))
    bad = [s for s in scopes if s not in SCOPES]
    if bad or not scopes:
        raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}")
    key_id, secret, token = new_key()
    row = ApiKey(
        key_id=key_id,
        secret_sha256=hash_secret(secret),
        name=name,
        scopes=scopes,
        rate_limit=rate_limit,
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, token


def _aware(dt: datetime | None) -> datetime | None:
    if dt is not None and dt.tzinfo is None:  # SQLite returns naive datetimes
        return dt.replace(tzinfo=UTC)
    return dt


class ApiKeyVerifier:
    """Checks tokens against the database, with a short positive cache keyed by the token's hash."""

    def __init__(self, session_factory: Callable[[], Session], cache_seconds: float) -> None:
        self._sessions = session_factory
        self._ttl = cache_seconds
        self._cache: dict[str, tuple[Principal, float]] = {}
        self._lock = threading.Lock()

    def cached(self, token: str) -> Principal | None:
        """The principal of a recently verified token, without I/O; None: call :meth:`verify`."""
        with self._lock:
            hit = self._cache.get(hashlib.sha256(token.encode()).hexdigest())
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def verify(self, token: str) -> Principal | None:
        parts = split_token(token)
        if parts is None:
            return None
        hit = self.cached(token)
        if hit is not None:
            return hit
        cache_key = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        key_id, secret = parts
        with self._sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
            if row is None or not hmac.compare_digest(row.secret_sha256, hash_secret(secret)):
                return None
            if row.revoked_at is not None:
                return None
            expires = _aware(row.expires_at)
            if expires is not None and expires <= datetime.now(UTC):
                return None
            principal = Principal(
                name=f"key:{row.key_id}:{row.name}"[:160],
                method="api-key",
                scopes=expand_scopes(row.scopes or []),
                rate_limit=row.rate_limit,
            )
        if self._ttl > 0:
            ttl = (
                self._ttl
                if expires is None
                else min(self._ttl, (expires - datetime.now(UTC)).total_seconds())
            )
            with self._lock:
                if len(self._cache) > 10_000:
                    self._cache.clear()
                self._cache[cache_key] = (principal, now + ttl)
        return principal

    def forget(self) -> None:
        with self._lock:
            self._cache.clear()


# --- OIDC ---------------------------------------------------------------------------------------


class OidcVerifier:
    """Verifies JWT access tokens from one issuer against a JWKS file read at start-up."""

    ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")

    def __init__(self, settings: Settings) -> None:
        import jwt

        assert settings.oidc_issuer and settings.oidc_audience and settings.oidc_jwks_file
        self.issuer = settings.oidc_issuer
        self.audience = settings.oidc_audience
        self.scope_claim = settings.oidc_scope_claim
        self.prefix = settings.oidc_scope_prefix
        self.jwks = jwt.PyJWKSet.from_dict(json.loads(settings.oidc_jwks_file.read_text()))

    @classmethod
    def from_settings(cls, settings: Settings) -> OidcVerifier | None:
        if not settings.oidc_issuer:
            return None
        if not (settings.oidc_audience and settings.oidc_jwks_file):
            raise ValueError("LUSAI_OIDC_ISSUER needs LUSAI_OIDC_AUDIENCE and LUSAI_OIDC_JWKS_FILE")
        return cls(settings)

    def _key(self, kid: str | None) -> Any:
        keys = [k for k in self.jwks.keys if kid is None or k.key_id == kid]
        if len(keys) != 1:
            return None
        return keys[0]

    def verify(self, token: str) -> Principal | None:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            jwk = self._key(header.get("kid"))
            if jwk is None or header.get("alg") not in self.ALGORITHMS:
                return None
            claims = jwt.decode(
                token,
                jwk.key,
                algorithms=[header["alg"]],
                audience=self.audience,
                issuer=self.issuer,
                options={"require": ["exp", "iss", "aud", "sub"]},
                leeway=30,
            )
        except jwt.PyJWTError:
            return None
        raw = claims.get(self.scope_claim, "")
        items = (
            raw.split() if isinstance(raw, str) else [str(x) for x in raw] if isinstance(raw, list) else []
        )
        scopes = expand_scopes(s[len(self.prefix) :] for s in items if s.startswith(self.prefix))
        return Principal(name=f"oidc:{claims['sub']}"[:160], method="oidc", scopes=scopes)


# --- rate limiting ------------------------------------------------------------------------------


class RateLimiter:
    """Token bucket per principal, in process memory (each API process limits on its own)."""

    def __init__(self, per_minute: int, burst: int) -> None:
        self.per_minute = per_minute
        self.burst = burst
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, who: str, per_minute: int | None = None) -> tuple[bool, float, int, int]:
        """(allowed, retry_after_s, remaining, limit) for one request by ``who``."""
        limit = self.per_minute if per_minute is None else per_minute
        if limit <= 0:
            return True, 0.0, -1, 0
        rate = limit / 60.0
        capacity = float(max(self.burst, 1))
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(who, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return True, 0.0, int(tokens - 1.0), limit
            self._buckets[who] = (tokens, now)
            if len(self._buckets) > 100_000:
                self._buckets.clear()
        return False, (1.0 - tokens) / rate, 0, limit
