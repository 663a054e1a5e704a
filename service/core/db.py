"""The database of one process: its engine and session factory, owned by :class:`Database`.

Built once per process by :class:`service.core.runtime.Runtime` and passed down; nothing here
reads the environment or keeps a process-wide cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool


def make_engine(url: str, *, pooled: bool = True) -> Engine:
    """SQLite gets WAL and a busy timeout so the SCP, API and worker can share one file.

    ``pooled=False``: every session opens its own connection and closes it (a thread that writes
    now and then in a process that forks, such as the worker registry's heartbeat).
    """
    kwargs: dict[str, Any] = {"pool_pre_ping": True} if pooled else {"poolclass": NullPool}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 30, "check_same_thread": False}
    engine = create_engine(url, **kwargs)
    if url.startswith("sqlite"):

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA busy_timeout=30000")
            # WAL is a property of the file: set once. Setting it again on every connection (the
            # registry's heartbeat opens one each beat) can answer "database is locked" at once,
            # without waiting, while another connection writes (seen in CI).
            if str(cur.execute("PRAGMA journal_mode").fetchone()[0]).lower() != "wal":
                cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

    return engine


class Database:
    """One engine (its connection pool) and the session factory on it.

    Creating one opens no connection; :meth:`dispose` closes the pool's connections, so a test's
    SQLite file can be removed and a PostgreSQL database dropped.
    """

    def __init__(self, url: str, *, pooled: bool = True) -> None:
        self.url = url
        self.engine = make_engine(url, pooled=pooled)
        #: Sessions whose objects stay readable after commit (rows are handed to callers).
        self.sessions: sessionmaker[Session] = sessionmaker(bind=self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A transaction: commit on success, roll back on error."""
        session = self.sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        """Raise if the database cannot answer a trivial query (``/health``, ``lusai check``)."""
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    def dispose(self) -> None:
        self.engine.dispose()
