"""Alembic from an empty database to head and back, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from migrations.runner import downgrade, upgrade
from service.core.models import Base


def _roundtrip(url: str) -> None:
    upgrade(url)
    engine = create_engine(url)
    try:
        tables = set(inspect(engine).get_table_names())
        assert {"studies", "series", "instances", "jobs", "results", "deliveries"} <= tables
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
        assert diff == [], f"models and migrations disagree: {diff}"
        downgrade(url)
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        upgrade(url)  # and up again: downgrade left nothing behind that blocks it
    finally:
        engine.dispose()


def test_sqlite_upgrade_downgrade(tmp_path: Path) -> None:
    _roundtrip(f"sqlite:///{tmp_path / 'm.sqlite'}")


@pytest.mark.postgres
def test_postgres_upgrade_downgrade(pg_url: str) -> None:
    _roundtrip(pg_url)


def _gradability_data(url: str) -> None:
    """0004 keeps every existing result gradable; down again, a result without a score becomes 0
    (what versions before 0004 called an unreadable clip) instead of blocking the downgrade."""
    from sqlalchemy import text

    upgrade(url, "0003")
    engine = create_engine(url)
    now = "2026-12-01 10:00:00"
    rows = [
        "INSERT INTO studies (id, study_instance_uid, created_at) VALUES (1, '1.2.3', :now)",
        "INSERT INTO series (id, series_instance_uid, study_id, created_at) VALUES (1, '1.2.3.1', 1, :now)",
        "INSERT INTO instances (id, sop_instance_uid, version, series_id, sop_class_uid, transfer_syntax_uid,"
        " frames, received_at, storage_key, sha256, size_bytes, state)"
        " VALUES (1, '1.2.3.1.1', 1, 1, '1.2', '1.2', 4, :now, 'k', 's', 1, 'accepted')",
        "INSERT INTO jobs (id, instance_id, state, attempts, timings_ms, created_at)"
        " VALUES (1, 1, 'succeeded', 1, '{}', :now), (2, 1, 'succeeded', 1, '{}', :now)",
        "INSERT INTO results (id, job_id, instance_id, score, frame_scores, key_frame, b_line_fraction,"
        " b_line_count, consolidation, effusion, measurements, model_name, model_version, weights_sha256,"
        " created_at) VALUES (1, 1, 1, 2, '[]', 0, 0.0, 0, false, false, '{}', 'm', 'v', 'w', :now)",
    ]
    try:
        with engine.begin() as conn:
            for sql in rows:
                conn.execute(text(sql), {"now": now})
        upgrade(url)
        with engine.begin() as conn:
            assert conn.execute(text("SELECT score, gradable, ungradable_reason FROM results")).all() == [
                (2, True, None)
            ]
            conn.execute(
                text(
                    "INSERT INTO results (id, job_id, instance_id, score, gradable, ungradable_reason,"
                    " frame_scores, key_frame, b_line_fraction, b_line_count, consolidation, effusion,"
                    " measurements, model_name, model_version, weights_sha256, created_at) VALUES (2, 2, 1,"
                    " NULL, false, 'noise', '[]', 0, 0.0, 0, false, false, '{}', 'm', 'v', 'w', :now)"
                ),
                {"now": now},
            )
        downgrade(url, "0003")
        with engine.connect() as conn:
            assert conn.execute(text("SELECT id, score FROM results ORDER BY id")).all() == [(1, 2), (2, 0)]
    finally:
        engine.dispose()


def test_sqlite_gradability_data(tmp_path: Path) -> None:
    _gradability_data(f"sqlite:///{tmp_path / 'g.sqlite'}")


@pytest.mark.postgres
def test_postgres_gradability_data(pg_url: str) -> None:
    _gradability_data(pg_url)
