"""Databases shared by the API and CLI tests: a migrated SQLite template copied per test, and a
migrated PostgreSQL database for the session (skipped when the server is unreachable, a failure
under ``LUSAI_REQUIRE_EXTERNAL=1``)."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from service.core.models import Base
from tests.conftest import PG_ADMIN_URL, missing


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied per test (migrating each time would dominate the run)."""
    from migrations.runner import upgrade

    path = tmp_path_factory.mktemp("template") / "lusai.sqlite"
    upgrade(f"sqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str | None]:
    """A migrated PostgreSQL database for the session; None when the server is unreachable."""
    from migrations.runner import upgrade

    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    name = f"lusai_api_test_{uuid.uuid4().hex[:8]}"
    try:
        with admin.connect() as c:
            c.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception:
        admin.dispose()
        yield None
        return
    url = PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    upgrade(url)
    yield url
    with admin.connect() as c:  # FORCE: an app's pooled connections do not keep it
        c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _truncate(url: str) -> None:
    engine = create_engine(url)
    tables = ", ".join(t.name for t in Base.metadata.sorted_tables)
    with engine.begin() as c:
        c.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
    engine.dispose()


def database_url(request: pytest.FixtureRequest, backend: str, folder: Path) -> str:
    """An empty migrated database: a copy of the SQLite template in ``folder``, or the test
    PostgreSQL truncated (skipped when it is missing, a failure when CI requires it)."""
    if backend == "sqlite":
        target = folder / "lusai.sqlite"
        shutil.copy(request.getfixturevalue("sqlite_template"), target)
        return f"sqlite:///{target}"
    url = request.getfixturevalue("pg_database")
    if url is None:
        missing(f"PostgreSQL at {PG_ADMIN_URL}")
    _truncate(url)
    return str(url)
