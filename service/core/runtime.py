"""The runtime of one process: settings, database, object store and queue, built once and passed down.

Each entry point builds one from ``Settings()`` (the CLI commands, the FastAPI app factory, the
SCP processes, the Celery worker's ``worker_process_init``) and closes it when it stops; library
code takes it, or just the piece it needs, as an argument, and never looks up a process-wide
instance. Tests build their own, on their own settings, instead of clearing caches.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from types import TracebackType
from typing import Self

from service.core.db import Database
from service.core.queue import TaskQueue
from service.core.settings import Settings
from service.core.storage import FilesystemStore, ObjectStore


@dataclass
class Runtime:
    settings: Settings
    db: Database
    queue: TaskQueue

    @classmethod
    def from_settings(cls, settings: Settings) -> Self:
        """Open nothing yet: the engine connects, the producer and the store are made on first use."""
        db = Database(settings.db_url)
        return cls(settings=settings, db=db, queue=TaskQueue(settings, db))  # db: the worker registry

    @cached_property
    def store(self) -> ObjectStore:
        """Made on first use: a command that only reads the database creates no storage folders."""
        return FilesystemStore(self.settings.storage)

    def close(self) -> None:
        """Release the broker and database connections (the runtime is not used afterwards)."""
        self.queue.close()
        self.db.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
