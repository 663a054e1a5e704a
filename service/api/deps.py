"""Request dependencies: the app's runtime, a database session, and the authenticated, rate-limited caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, TypeVar

import anyio
from fastapi import Depends, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from service.api.audit import AuditWriter
from service.api.auth import ApiKeyVerifier, OidcVerifier, Principal, RateLimiter, expand_scopes
from service.api.problems import ProblemError
from service.core.runtime import Runtime


@dataclass
class ApiState:
    """Everything the routes share, built once in ``create_app`` and kept in ``app.state.lusai``:
    the process's runtime (settings, database, store, queue) and the API's own parts on it."""

    runtime: Runtime
    read_sessions: sessionmaker[Session]  # autocommit: no BEGIN/ROLLBACK round trips for GETs
    audit: AuditWriter
    keys: ApiKeyVerifier
    oidc: OidcVerifier | None
    limiter: RateLimiter
    gauges: CollectorRegistry  # queue and delivery gauges on this app's database (``/metrics``)


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.lusai
    return state


def get_runtime(request: Request) -> Runtime:
    return api_state(request).runtime


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one handler; routes depend on it with scope="function", so its connection goes
    back to the pool before the response (and the audit row written before it) is sent.

    Async so that FastAPI does not spend a threadpool hop on it: creating a session does no I/O,
    and closing one only returns its connection (the handler's thread already ended the transaction).
    """
    st = api_state(request)
    # Reads need no transaction (PostgreSQL's READ COMMITTED snapshots each statement anyway).
    session = st.read_sessions() if request.method in ("GET", "HEAD") else st.runtime.db.sessions()
    try:
        yield session
    finally:
        session.close()


T = TypeVar("T")


async def run_db(request: Request, work: Callable[[Session], T]) -> T:
    """Run ``work`` with a session in the threadpool: for async handlers on the hot path.

    A sync handler costs two threadpool hops (FastAPI also validates its return value there); an
    async handler that sends only its database work to a thread costs one.
    """
    st = api_state(request)
    maker = st.read_sessions if request.method in ("GET", "HEAD") else st.runtime.db.sessions

    def run() -> T:
        with maker() as session:
            return work(session)

    return await anyio.to_thread.run_sync(run)


#: The handler's session (connection released before the response is sent).
DbSession = Annotated[Session, Depends(get_session, scope="function")]
#: The app's runtime, for handlers that send to the queue or read settings and storage.
AppRuntime = Annotated[Runtime, Depends(get_runtime)]

_ANONYMOUS = Principal(name="anonymous", method="anonymous", scopes=expand_scopes(["read"]))
_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="lusai"'}

#: OpenAPI security schemes; ``create_app`` attaches them to every /api/ operation. Headers are read
#: in :func:`authenticate` directly: one dependency per request instead of three.
SECURITY_SCHEMES = {
    "APIKeyHeader": {
        "type": "apiKey",
        "in": "header",
        "name": "X-API-Key",
        "description": "API key from `lusai apikey create` (lusai_...).",
    },
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "OIDC access token (JWT), or an API key as bearer token.",
    },
}


async def authenticate(request: Request) -> Principal:
    """Resolve the caller from X-API-Key or Authorization: Bearer; 401 without valid credentials."""
    st = api_state(request)
    api_key = request.headers.get("x-api-key")
    token = api_key
    if not token:
        scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            token = credentials.strip()
    if not token:
        if not st.runtime.settings.api_keys_required:
            return _ANONYMOUS
        raise ProblemError(
            401, "unauthorized", "send an API key (X-API-Key) or a bearer token", headers=_CHALLENGE
        )
    if token.startswith("lusai_"):
        found = st.keys.cached(token)
        if found is None:  # a database look-up: off the event loop
            found = await asyncio.to_thread(st.keys.verify, token)
    elif st.oidc is not None and api_key is None:
        found = st.oidc.verify(token)
    else:
        found = None
    if found is None:
        raise ProblemError(401, "unauthorized", "invalid, expired or revoked credentials", headers=_CHALLENGE)
    return found


def _rate_limit(request: Request, principal: Principal) -> None:
    allowed, retry_after, remaining, limit = api_state(request).limiter.take(
        principal.name, principal.rate_limit
    )
    if limit:
        request.state.rate = (limit, remaining)
    if not allowed:
        raise ProblemError(
            429,
            "rate-limited",
            f"more than {limit} requests per minute",
            headers={"Retry-After": str(max(1, round(retry_after + 0.5)))},
        )


def _single_query_values(request: Request) -> None:
    """No operation takes a list in the query: a repeated parameter is ambiguous, so it is a 400."""
    keys = [k for k, _ in request.query_params.multi_items()]
    if len(keys) != len(set(keys)):
        raise ProblemError(400, "bad-request", "a query parameter is repeated")


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """Dependency factory: authenticate, rate-limit, then check the caller holds ``scope``
    (admin > write > read). The principal is left in ``request.state`` for the audit log."""

    async def _dep(request: Request) -> Principal:
        principal = await authenticate(request)
        request.state.principal = principal
        _rate_limit(request, principal)
        if not principal.has(scope):
            raise ProblemError(403, "forbidden", f"this operation needs the '{scope}' scope")
        _single_query_values(request)
        return principal

    _dep.__name__ = f"require_{scope}"
    return _dep


read_scope = require("read")
write_scope = require("write")
admin_scope = require("admin")
