"""Duplicates and versions, routing, database outages and recovery, over the network."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from service.core import recovery
from service.core.db import make_engine
from service.core.header import read_header
from service.core.models import Base
from service.core.routing import RoutingRules
from service.receive.spool import drain_spool
from tests.factories import cine, save
from tests.service.receive.conftest import Running, inprocess_scp, send

SUCCESS = 0x0000


@pytest.mark.network
def test_same_bytes_twice_is_acknowledged_not_requeued(scp: Running, tmp_path: Path) -> None:
    path = save(cine("raw", frames=3), tmp_path / "a.dcm")
    assert send(scp.port, [path]) == [SUCCESS]
    assert send(scp.port, [path, path]) == [SUCCESS, SUCCESS]
    [inst] = scp.instances()
    assert inst.version == 1
    assert len(scp.jobs()) == 1 and len(scp.queued_job_ids()) == 1
    assert len(scp.stored_files()) == 1


@pytest.mark.network
def test_same_uid_other_bytes_is_a_new_version_and_reanalysed(scp: Running) -> None:
    uid = generate_uid()
    first = cine("raw", frames=3, seed=1, sop_uid=uid)
    second = cine("raw", frames=3, seed=2, sop_uid=uid, study_uid=first.StudyInstanceUID)
    second.SeriesInstanceUID = first.SeriesInstanceUID
    assert send(scp.port, [first]) == [SUCCESS]
    assert send(scp.port, [second]) == [SUCCESS]
    v1, v2 = scp.instances()
    assert (v1.sop_instance_uid, v1.version) == (uid, 1)
    assert (v2.sop_instance_uid, v2.version) == (uid, 2)
    assert v1.sha256 != v2.sha256
    # nothing overwritten: both versions' bytes are on disk
    assert scp.store.path(v1.storage_key).is_file() and scp.store.path(v2.storage_key).is_file()
    assert [j.instance_id for j in scp.jobs()] == [v1.id, v2.id]
    assert len(scp.queued_job_ids()) == 2
    # and the first version sent again is still a duplicate of version 1
    assert send(scp.port, [first]) == [SUCCESS]
    assert len(scp.instances()) == 2 and len(scp.jobs()) == 2


@pytest.mark.network
def test_non_us_modality_stored_and_ignored(scp: Running) -> None:
    ds = cine("raw", frames=2, modality="OT")
    assert send(scp.port, [ds]) == [SUCCESS]
    [inst] = scp.instances()
    assert inst.state == "ignored" and inst.ignore_reason == "modality is not US"
    assert scp.jobs() == [] and scp.queued_job_ids() == []
    assert len(scp.stored_files()) == 1


@pytest.mark.network
def test_routing_rules_from_settings(scp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(LUSAI_ROUTE_BODY_PART="^(CHEST|LUNG|THORAX)$", LUSAI_ROUTE_CALLING_AE="^US")
    lung = cine("raw", frames=2, body_part="CHEST")
    heart = cine("raw", frames=2, body_part="HEART")
    assert send(scp.port, [lung, heart], ae_title="US_ROOM1") == [SUCCESS, SUCCESS]
    other_ae = cine("raw", frames=2, body_part="LUNG")
    assert send(scp.port, [other_ae], ae_title="CT_ROOM") == [SUCCESS]
    states = {i.sop_instance_uid: (i.state, i.ignore_reason, i.calling_ae) for i in scp.instances()}
    assert states[lung.SOPInstanceUID] == ("accepted", None, "US_ROOM1")
    assert states[heart.SOPInstanceUID][:2] == ("ignored", "body part does not match the routing rule")
    assert states[other_ae.SOPInstanceUID][:2] == ("ignored", "calling AE does not match the routing rule")
    assert len(scp.jobs()) == 1


def test_routing_rule_on_descriptions(tmp_path: Path) -> None:
    path = save(cine("raw", frames=2), tmp_path / "a.dcm")
    header, _ = read_header(path)
    assert RoutingRules(description=r"\blung\b").decide(header, None) is None
    assert RoutingRules(description=r"cardiac").decide(header, None) == (
        "description does not match the routing rule"
    )


@pytest.mark.network
def test_database_down_object_spooled_then_indexed_and_queued(tmp_path: Path) -> None:
    """PostgreSQL unreachable: Success (the object is safely stored), then recovery indexes it."""
    data = tmp_path / "data"
    sent = cine("jpeg", frames=3)
    with inprocess_scp(data, LUSAI_DATABASE_URL="postgresql+psycopg2://lusai@127.0.0.1:1/lusai") as scp:
        assert send(scp.port, [sent]) == [SUCCESS]
        assert len(scp.stored_files()) == 1
        assert len(scp.spooled()) == 1
        assert scp.queued_job_ids() == []
        stored = scp.stored_files()[0]
    # The database is back (here: the embedded SQLite); the recovery sweep drains the spool.
    with inprocess_scp(data) as scp:
        assert drain_spool(scp.runtime) == 1
        [inst] = scp.instances()
        assert inst.sop_instance_uid == sent.SOPInstanceUID and inst.state == "accepted"
        assert scp.store.path(inst.storage_key) == stored
        [job] = scp.jobs()
        assert scp.queued_job_ids() == [job.id] and job.enqueued_at is not None
        assert scp.spooled() == []


@pytest.mark.network
def test_locked_sqlite_is_database_down(tmp_path: Path) -> None:
    """A read-only SQLite file: the object is kept and spooled, the sender still gets Success."""
    data = tmp_path / "data"
    data.mkdir()
    db = data / "ro.sqlite"
    url = f"sqlite:///{db}"
    engine = make_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    os.chmod(db, 0o444)
    ro_url = f"sqlite:///file:{db}?mode=ro&uri=true"
    with inprocess_scp(data, LUSAI_DATABASE_URL=ro_url) as scp:
        assert send(scp.port, [cine("raw", frames=2)]) == [SUCCESS]
        assert len(scp.spooled()) == 1 and len(scp.stored_files()) == 1


def test_stale_temp_files_are_swept(tmp_path: Path) -> None:
    with inprocess_scp(tmp_path / "d") as scp:
        old = scp.store.tmp_dir / "abandoned.part"
        fresh = scp.store.tmp_dir / "receiving.part"
        old.write_bytes(b"x")
        fresh.write_bytes(b"y")
        os.utime(old, (time.time() - 7200, time.time() - 7200))
        assert recovery.remove_stale_temp_files(scp.runtime) == 1
        assert not old.exists() and fresh.exists()


@pytest.mark.network
def test_broker_down_job_kept_and_sent_by_recovery(tmp_path: Path) -> None:
    """Redis unreachable: Success, the job row waits unsent; the recovery sweep sends it later."""
    data = tmp_path / "data"
    with inprocess_scp(data, LUSAI_BROKER_URL="redis://127.0.0.1:1/0") as scp:
        assert send(scp.port, [cine("raw", frames=2)]) == [SUCCESS]
        [job] = scp.jobs()
        assert job.state == "queued" and job.enqueued_at is None
    with inprocess_scp(data) as scp:  # broker back (here: the embedded one)
        assert recovery.requeue_stale_jobs(scp.runtime) == 1
        [job] = scp.jobs()
        assert scp.queued_job_ids() == [job.id] and job.enqueued_at is not None
