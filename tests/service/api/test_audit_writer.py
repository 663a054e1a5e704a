"""The audit writer's group commit on a real PostgreSQL: a row the database refuses fails alone."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from service.api.audit import AuditWriter, audit_engine
from service.core.models import AuditEvent, Base

pytestmark = pytest.mark.postgres


def _row(request_id: str, resource: str = "/api/v1/results") -> dict[str, Any]:
    return {
        "at": datetime.now(UTC),
        "principal": "reader",
        "auth_method": "api-key",
        "action": "GET",
        "route": "/api/v1/results",
        "resource": resource,
        "query_keys": None,
        "status": 200,
        "request_id": request_id,
        "client": "127.0.0.1",
    }


def test_one_refused_row_does_not_fail_the_batch_it_was_committed_with(pg_url: str) -> None:
    """Regression (found following up the campaign's NUL-in-URL defect): the rows of a batch went in
    one INSERT, so one value PostgreSQL refuses (a NUL in a string) failed every request that was
    committed with it: each answered 503, its audit row lost."""
    setup = create_engine(pg_url)
    Base.metadata.create_all(setup)
    setup.dispose()
    writer = AuditWriter(audit_engine(pg_url), durable=False)
    rows = [_row("a1"), _row("bad", resource="/api/v1/studies/\x00x"), _row("a2"), _row("a3")]

    async def write_all() -> list[bool]:
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in rows]
        for row, fut in zip(rows, futures, strict=True):  # queued before the thread runs: one batch
            writer._queue.put((row, loop, fut))
        writer._ensure_thread()
        return list(await asyncio.gather(*futures))

    assert asyncio.run(write_all()) == [True, False, True, True]
    with writer.engine.connect() as c:
        stored = set(c.scalars(select(AuditEvent.request_id)))
    writer.engine.dispose()
    assert stored == {"a1", "a2", "a3"}
