"""Request dependencies: settings, a database session, and the authenticated, rate-limited caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from service.api.audit import AuditWriter
from service.api.auth import ApiKeyVerifier, OidcVerifier, Principal, RateLimiter, expand_scopes
from service.api.problems import ProblemError
from service.settings import Settings
from service.store.files import ObjectStore

api_key_header = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="API key from `lusai apikey create` (lusai_...)."
)
bearer = HTTPBearer(auto_error=False, description="OIDC access token (JWT), or an API key as bearer token.")


@dataclass
class ApiState:
    """Everything the routes share, built once in ``create_app``."""

    settings: Settings
    sessions: sessionmaker[Session]
    audit: AuditWriter
    store: ObjectStore
    keys: ApiKeyVerifier
    oidc: OidcVerifier | None
    limiter: RateLimiter


def api_state(request: Request) -> ApiState:
    state: ApiState = request.app.state.lusai
    return state


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one handler; routes depend on it with scope="function", so its connection goes
    back to the pool before the response (and the audit row written before it) is sent.

    Async so that FastAPI does not spend a threadpool hop on it: creating a session does no I/O,
    and closing one only returns its connection (the handler's thread already ended the transaction).
    """
    session = api_state(request).sessions()
    try:
        yield session
    finally:
        session.close()


#: The handler's session (connection released before the response is sent).
DbSession = Annotated[Session, Depends(get_session, scope="function")]

_ANONYMOUS = Principal(name="anonymous", method="anonymous", scopes=expand_scopes(["read"]))


async def authenticate(
    request: Request,
    api_key: str | None = Security(api_key_header),
    credentials: HTTPAuthorizationCredentials | None = Security(bearer),
) -> Principal:
    """Resolve the caller from X-API-Key or Authorization: Bearer; 401 without valid credentials."""
    st = api_state(request)
    token = api_key or (credentials.credentials if credentials is not None else None)
    challenge = {"WWW-Authenticate": 'Bearer realm="lusai"'}
    if not token:
        if not st.settings.api_keys_required:
            principal = _ANONYMOUS
        else:
            raise ProblemError(
                401, "unauthorized", "send an API key (X-API-Key) or a bearer token", headers=challenge
            )
    else:
        if token.startswith("lusai_"):
            found = st.keys.cached(token)
            if found is None:  # a database look-up: off the event loop
                found = await asyncio.to_thread(st.keys.verify, token)
        elif st.oidc is not None and api_key is None:
            found = st.oidc.verify(token)
        else:
            found = None
        if found is None:
            raise ProblemError(
                401, "unauthorized", "invalid, expired or revoked credentials", headers=challenge
            )
        principal = found
    request.state.principal = principal
    allowed, retry_after, remaining, limit = st.limiter.take(principal.name, principal.rate_limit)
    if limit:
        request.state.rate = (limit, remaining)
    if not allowed:
        raise ProblemError(
            429,
            "rate-limited",
            f"more than {limit} requests per minute",
            headers={"Retry-After": str(max(1, round(retry_after + 0.5)))},
        )
    return principal


def require(scope: str) -> Callable[..., Awaitable[Principal]]:
    """Dependency factory: the caller must hold ``scope`` (admin > write > read)."""

    async def _dep(principal: Principal = Depends(authenticate)) -> Principal:
        if not principal.has(scope):
            raise ProblemError(403, "forbidden", f"this operation needs the '{scope}' scope")
        return principal

    _dep.__name__ = f"require_{scope}"
    return _dep


read_scope = require("read")
write_scope = require("write")
admin_scope = require("admin")


async def single_query_values(request: Request) -> None:
    """No operation takes a list in the query: a repeated parameter is ambiguous, so it is a 400."""
    keys = [k for k, _ in request.query_params.multi_items()]
    if len(keys) != len(set(keys)):
        raise ProblemError(400, "bad-request", "a query parameter is repeated")
