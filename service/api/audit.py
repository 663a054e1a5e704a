"""The audit log writer: every authenticated API access becomes a row before its response leaves.

Rows are written by one thread with group commit: a request hands its row over and waits; the
thread inserts everything that queued up meanwhile in one multi-row INSERT and one COMMIT, then
releases the waiters. An idle server commits each row at once; a busy one pays one commit per
batch instead of per request. Nothing is answered before its row is committed (fail closed).

On PostgreSQL the commit does not wait for the WAL flush unless ``LUSAI_AUDIT_DURABLE_COMMIT``
is set: rows are committed and visible, but a crash of the database server itself can lose the
last fraction of a second of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import queue
import threading
from collections.abc import MutableMapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qsl

from sqlalchemy import Engine, create_engine, insert, text
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, ProgrammingError

from service.api.auth import Principal
from service.api.metrics import AUDIT_FAILURES
from service.core.db import make_engine
from service.core.logs import ctx
from service.core.models import AuditEvent

log = logging.getLogger("lusai.api")

_INSERT = insert(AuditEvent)
_ASYNC_COMMIT = text("SET LOCAL synchronous_commit TO OFF")
MAX_BATCH = 500


class _Outcome(enum.Enum):
    """Of one INSERT: REFUSED is the rows' fault (a value the database will not take), so a batch
    refused is tried again row by row and only the bad row's request is answered 503."""

    COMMITTED = "committed"
    REFUSED = "refused"
    UNAVAILABLE = "unavailable"


def audit_engine(url: str) -> Engine:
    """The audit log's own pool, so an audit write never waits behind request sessions.

    No pre-ping on PostgreSQL; a connection found dead is invalidated by SQLAlchemy and the batch
    is retried once on a new one.
    """
    if url.startswith("postgresql"):
        return create_engine(url, pool_size=1, max_overflow=1, pool_pre_ping=False)
    return make_engine(url)


def event_row(scope: MutableMapping[str, Any], principal: Principal, status: int, rid: str) -> dict[str, Any]:
    """Who, what, when, outcome. The path, never the query string (filters may be patient IDs)."""
    route = scope.get("route")
    client = scope.get("client")
    keys = sorted({k for k, _ in parse_qsl(scope.get("query_string", b"").decode("latin-1"), True)})
    return {
        "at": datetime.now(UTC),
        "principal": principal.name,
        "auth_method": principal.method,
        "action": scope["method"][:8],
        "route": str(getattr(route, "path", "unmatched"))[:128],
        "resource": scope["path"][:512],
        "query_keys": ",".join(keys)[:256] or None,
        "status": status,
        "request_id": rid,
        "client": client[0] if client else None,
    }


_Waiter = tuple[dict[str, Any], asyncio.AbstractEventLoop, "asyncio.Future[bool]"]


class AuditWriter:
    def __init__(self, engine: Engine, *, durable: bool) -> None:
        self.engine = engine
        self.async_commit = engine.dialect.name == "postgresql" and not durable
        self._queue: queue.SimpleQueue[_Waiter] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def write(self, row: dict[str, Any]) -> bool:
        """True once the row is committed; False if it could not be (the caller answers 503)."""
        self._ensure_thread()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        self._queue.put((row, loop, fut))
        return await fut

    def _ensure_thread(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="lusai-audit", daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            batch = [self._queue.get()]
            while len(batch) < MAX_BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outcome = self._commit([row for row, _, _ in batch])
            if outcome is _Outcome.REFUSED and len(batch) > 1:  # one bad row must not fail the rest
                outcomes = [self._commit([row]) for row, _, _ in batch]
            else:
                outcomes = [outcome] * len(batch)
            results = [o is _Outcome.COMMITTED for o in outcomes]
            for (_, loop, fut), ok in zip(batch, results, strict=True):
                with contextlib.suppress(RuntimeError):  # that request's loop is gone: nobody waits
                    loop.call_soon_threadsafe(_resolve, fut, ok)

    def _commit(self, rows: list[dict[str, Any]]) -> _Outcome:
        """Never raises: the writer thread must outlive any database error."""
        error, outcome = "unknown", _Outcome.UNAVAILABLE
        for attempt in (1, 2):  # a second try on a fresh connection after a database restart
            try:
                with self.engine.begin() as conn:
                    if self.async_commit:
                        conn.execute(_ASYNC_COMMIT)
                    conn.execute(_INSERT, rows)
                return _Outcome.COMMITTED
            except DBAPIError as exc:
                error = type(exc).__name__
                if attempt == 1 and exc.connection_invalidated:
                    continue
                refused = isinstance(exc, DataError | IntegrityError | ProgrammingError)
                if refused or isinstance(exc.orig, ValueError):
                    outcome = _Outcome.REFUSED
            except ValueError as exc:  # a value the driver cannot send (a NUL in a string)
                error, outcome = type(exc).__name__, _Outcome.REFUSED
            except Exception as exc:
                error = type(exc).__name__
            break
        if outcome is _Outcome.REFUSED and len(rows) > 1:
            return outcome  # the caller retries row by row; each bad one is counted then
        AUDIT_FAILURES.inc(len(rows))
        log.error("audit write failed", extra=ctx(rows=len(rows), error=error))
        return outcome


def _resolve(fut: asyncio.Future[bool], ok: bool) -> None:
    if not fut.done():
        fut.set_result(ok)
