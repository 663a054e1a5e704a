"""The runtime of one process: its database, queue and store, each built once and released by close()."""

from __future__ import annotations

from pathlib import Path

import kombu.exceptions
import pytest
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from migrations.runner import upgrade
from service.core.db import Database
from service.core.models import ApiKey
from service.core.queue import ANALYZE_TASK, DELIVER_TASK, TaskQueue
from service.core.runtime import Runtime
from service.core.settings import Settings
from tests.conftest import broker_messages


def _key(key_id: str) -> ApiKey:
    return ApiKey(key_id=key_id, name=key_id, secret_sha256="0" * 64, scopes=["read"])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path / "data")
    s.data_dir.mkdir(parents=True)
    upgrade(s.db_url)
    return s


def test_session_commits_or_rolls_back(settings: Settings) -> None:
    db = Database(settings.db_url)
    with db.session() as s:
        s.add(_key("kept"))
    with pytest.raises(RuntimeError), db.session() as s:
        s.add(_key("dropped"))
        s.flush()
        raise RuntimeError("the caller failed")
    with db.session() as s:
        assert list(s.scalars(select(ApiKey.key_id))) == ["kept"]
    db.ping()
    db.dispose()


def test_ping_raises_when_the_database_is_unreachable() -> None:
    db = Database("postgresql+psycopg2://lusai@127.0.0.1:1/lusai")  # building it connects to nothing
    with pytest.raises(OperationalError):
        db.ping()
    db.dispose()


def test_queue_sends_by_name_and_makes_nothing_before_the_first_send(settings: Settings) -> None:
    queue = TaskQueue(settings)
    assert not settings.broker_dir.exists()
    queue.enqueue_analysis(7)
    queue.enqueue_delivery(8, countdown=30)
    queue.enqueue_delivery(9)
    queue.ping()
    sent = broker_messages(settings)
    assert sorted((task, args) for task, args, _ in sent) == [
        (ANALYZE_TASK, [7]),
        (DELIVER_TASK, [8]),
        (DELIVER_TASK, [9]),
    ]
    assert {args[0]: eta is not None for _, args, eta in sent} == {7: False, 8: True, 9: False}
    queue.close()
    queue.enqueue_analysis(10)  # a closed queue opens a new producer on the next send
    assert len(broker_messages(settings)) == 4
    queue.close()


def test_queue_ping_raises_when_the_broker_is_unreachable(tmp_path: Path) -> None:
    queue = TaskQueue(Settings(data_dir=tmp_path, broker_url="redis://127.0.0.1:1/0"))
    with pytest.raises(kombu.exceptions.OperationalError):
        queue.ping(timeout=0.5)
    queue.close()


def test_runtimes_are_independent_and_closed_by_their_owner(tmp_path: Path) -> None:
    """Two runtimes in one process (what process-wide caches made impossible): each its own data."""
    first, second = (Settings(data_dir=tmp_path / name) for name in ("a", "b"))
    for s in (first, second):
        s.data_dir.mkdir()
        upgrade(s.db_url)
    with Runtime.from_settings(first) as a, Runtime.from_settings(second) as b:
        assert not first.storage.exists()  # the store is made on first use
        assert a.store.root == first.storage and a.store is a.store
        with a.db.session() as s:
            s.add(_key("in-a"))
        a.queue.enqueue_analysis(1)
        with b.db.session() as s:
            assert list(s.scalars(select(ApiKey))) == []
        assert not second.broker_dir.exists()
    assert a.db.engine.pool.checkedout() == 0
