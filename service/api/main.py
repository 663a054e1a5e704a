"""FastAPI application factory (``lusai api``; also run inside ``lusai serve``)."""

from __future__ import annotations

import logging
import re
import time
import traceback
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from sqlalchemy.orm import sessionmaker
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import __version__
from service.api import problems
from service.api.audit import AuditWriter, audit_engine, event_row
from service.api.auth import ApiKeyVerifier, OidcVerifier, Principal, RateLimiter
from service.api.deps import SECURITY_SCHEMES, ApiState
from service.api.metrics import HTTP_LATENCY, HTTP_REQUESTS, database_registry
from service.api.routes import audit as audit_routes
from service.api.routes import deliveries, dicomweb, health, instances, jobs, results, reviews, studies
from service.core.logs import ctx
from service.core.runtime import Runtime
from service.core.settings import Settings
from service.core.study import ZoneRule

log = logging.getLogger("lusai.api")
_RID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
#: Paths that need credentials: each access is audited and documented with the security schemes.
AUTHENTICATED_PREFIXES = ("/api/", "/dicom-web/")

DESCRIPTION = """\
Lung-ultrasound inference service: studies, jobs, results, previews, deliveries.

* **Auth**: every `/api/v1` call needs an API key (`X-API-Key: lusai_...`, created with
  `lusai apikey create`) or an OIDC bearer token. Scopes: `read` < `write` < `admin`.
* **Errors** are RFC 9457 `application/problem+json` with the request's `request_id`.
* **Lists** use cursor pagination: pass `next_cursor` back as `cursor`.
* Every response carries `X-Request-ID`; rate-limited callers get 429 with `Retry-After`.
"""


class RequestContext:
    """Request ID, metrics, rate-limit headers and the audit log, as one pure ASGI middleware.

    The audit row is written when the response status is known and *before* the response leaves:
    if it cannot be written the client gets a 503 instead of the data (fail closed).
    """

    def __init__(self, app: ASGIApp, state: ApiState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = ""
        for k, v in scope.get("headers", ()):
            if k == b"x-request-id":
                rid = v.decode("latin-1")
                break
        if not _RID_RE.match(rid):
            rid = uuid.uuid4().hex
        st = scope.setdefault("state", {})
        st["request_id"] = rid
        t0 = time.perf_counter()
        started = False
        suppress = False
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal started, suppress, status
            if suppress:
                return
            if message["type"] == "http.response.start":
                status = message["status"]
                principal: Principal | None = st.get("principal")
                if principal is not None and scope["path"].startswith(AUTHENTICATED_PREFIXES):
                    ok = await self.state.audit.write(event_row(scope, principal, status, rid))
                    if not ok:
                        suppress = True
                        started = True
                        status = 503
                        resp = problems.problem_response(
                            Request(scope), 503, "audit-unavailable", detail="the access could not be audited"
                        )
                        resp.headers["X-Request-ID"] = rid
                        await resp(scope, receive, send)
                        return
                headers = list(message.get("headers", []))
                headers.append((b"x-request-id", rid.encode()))
                rate = st.get("rate")
                if rate is not None:
                    headers.append((b"ratelimit-limit", str(rate[0]).encode()))
                    headers.append((b"ratelimit-remaining", str(max(rate[1], 0)).encode()))
                message = {**message, "headers": headers}
                started = True
            await send(message)

        try:
            if _nul_in_url(scope):  # PostgreSQL text holds no NUL: a query or audit row would fail
                await problems.problem_response(
                    Request(scope), 400, "bad-request", detail="NUL characters are not allowed in the URL"
                )(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        except Exception as exc:
            if started:
                raise
            frames = traceback.extract_tb(exc.__traceback__)
            where = f"{frames[-1].filename}:{frames[-1].lineno}" if frames else None
            log.error("unhandled error", extra=ctx(request_id=rid, error=type(exc).__name__, where=where))
            resp = problems.problem_response(
                Request(scope), 500, "internal-error", detail="unexpected error; quote the request ID"
            )
            await resp(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            path = getattr(route, "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], path, str(status)).inc()
            HTTP_LATENCY.labels(path).observe(time.perf_counter() - t0)


def _nul_in_url(scope: Scope) -> bool:
    query: bytes = scope.get("query_string", b"")
    return "\x00" in scope["path"] or b"%00" in query or b"\x00" in query


def create_app(runtime: Runtime | None = None) -> FastAPI:
    """The app on ``runtime``, kept in ``app.state.lusai`` for the routes and dependencies.

    Without one (``uvicorn --factory service.api.main:create_app``, each uvicorn worker) the app
    is its own entry point: it builds a runtime from the environment and closes it at shutdown. A
    runtime passed in stays the caller's to close (``lusai serve`` shares its own with the SCP).
    """
    owned = runtime is None
    rt = Runtime.from_settings(Settings()) if runtime is None else runtime
    settings = rt.settings
    state = ApiState(
        runtime=rt,
        read_sessions=sessionmaker(
            bind=rt.db.engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
        ),
        audit=AuditWriter(audit_engine(settings.db_url), durable=settings.audit_durable_commit),
        keys=ApiKeyVerifier(rt.db.sessions, settings.api_key_cache_seconds),
        oidc=OidcVerifier.from_settings(settings),
        limiter=RateLimiter(settings.api_rate_limit, settings.api_rate_burst),
        gauges=database_registry(rt),
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if owned:
            rt.close()

    app = FastAPI(
        lifespan=lifespan,
        title="lusai",
        version=__version__,
        description=DESCRIPTION,
        openapi_tags=[
            {"name": "studies", "description": "Studies and series received over DICOM or upload."},
            {"name": "instances", "description": "Received objects, upload and re-analysis."},
            {"name": "results", "description": "Scores, measurements, SEG/SR downloads and previews."},
            {"name": "reviews", "description": "Readers' own scores of results, and model-reader agreement."},
            {"name": "jobs", "description": "Analysis jobs."},
            {"name": "deliveries", "description": "Results sent back to PACS."},
            {
                "name": "dicomweb",
                "description": "DICOMweb STOW-RS: store instances as a PACS would (PS3.18).",
            },
            {"name": "audit", "description": "Access log (admin)."},
            {"name": "health", "description": "Liveness, readiness and metrics (no authentication)."},
        ],
    )
    app.state.lusai = state
    app.state.zone_rule = ZoneRule.from_settings(settings)
    problems.install(app)
    if not settings.api_keys_required:
        log.warning("LUSAI_API_KEYS_REQUIRED is off: anonymous callers get read access")
    app.add_middleware(RequestContext, state=state)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type", "X-Request-ID", "If-None-Match"],
            expose_headers=["X-Request-ID", "RateLimit-Limit", "RateLimit-Remaining", "Retry-After", "ETag"],
        )
    app.include_router(health.router)
    for module in (studies, instances, results, reviews, jobs, deliveries, audit_routes, dicomweb):
        app.include_router(module.router)
    _document_security(app)
    return app


def _document_security(app: FastAPI) -> None:
    """Declare the API key and bearer schemes on every /api/ and /dicom-web/ operation of the
    OpenAPI document."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            spec.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
            for path, ops in spec.get("paths", {}).items():
                if path.startswith(AUTHENTICATED_PREFIXES):
                    for op in ops.values():
                        op["security"] = [{name: []} for name in SECURITY_SCHEMES]
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
