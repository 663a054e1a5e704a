"""The spool: objects stored while the database was down are indexed and queued by the SCP's
recovery step (:func:`drain_spool`), once the database is back; nothing received is lost."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sqlalchemy import select

from service.core.db import Database
from service.core.models import Instance, InstanceState, Job, JobState
from service.core.queue import ANALYZE_TASK
from service.core.runtime import Runtime
from service.receive.spool import drain_spool, pending, spool_dir, spool_object
from tests.conftest import broker_messages
from tests.factories import cine, save


def _stored_cine(runtime: Runtime, tmp_path: Path, body_part: str = "CHEST") -> tuple[str, str]:
    """A cine already in the store, as the SCP leaves it when indexing failed: (key, SOP UID)."""
    ds = cine("raw", frames=2, body_part=body_part)
    key, _, _ = runtime.store.put_file(save(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm"))
    return key, str(ds.SOPInstanceUID)


def _instances(runtime: Runtime) -> list[Instance]:
    with runtime.db.session() as s:
        rows = list(s.scalars(select(Instance)))
        s.expunge_all()
        return rows


def test_a_spool_record_names_the_object_by_its_hash_only(runtime: Runtime, tmp_path: Path) -> None:
    key, uid = _stored_cine(runtime, tmp_path)
    assert spool_object(runtime.settings, key, "SCANNER")
    [(path, record)] = pending(runtime.settings)
    assert path.name == f"{Path(key).stem}.json" and uid not in path.read_text()  # no UID, no PHI
    assert (record["key"], record["calling_ae"]) == (key, "SCANNER")
    assert [p.name for p in spool_dir(runtime.settings).iterdir()] == [path.name]  # no temp left


def test_draining_indexes_and_queues_then_forgets_the_record(runtime: Runtime, tmp_path: Path) -> None:
    key, uid = _stored_cine(runtime, tmp_path)
    spool_object(runtime.settings, key, "SCANNER")

    assert drain_spool(runtime) == 1

    [inst] = _instances(runtime)
    assert (inst.sop_instance_uid, inst.storage_key, inst.calling_ae) == (uid, key, "SCANNER")
    assert inst.state == InstanceState.ACCEPTED
    with runtime.db.session() as s:
        [job] = s.scalars(select(Job))
        assert job.state == JobState.QUEUED and job.enqueued_at is not None
    assert [m.args for m in broker_messages(runtime.settings) if m.task == ANALYZE_TASK] == [[job.id]]
    assert pending(runtime.settings) == []
    assert drain_spool(runtime) == 0


def test_routing_applies_to_spooled_objects(runtime: Runtime, tmp_path: Path) -> None:
    key, _ = _stored_cine(runtime, tmp_path, body_part="HEART")
    spool_object(runtime.settings, key, None)
    chest_only = replace(runtime, settings=runtime.settings.model_copy(update={"route_body_part": "^CHEST$"}))
    assert drain_spool(chest_only) == 1
    [inst] = _instances(runtime)
    assert inst.state == InstanceState.IGNORED and broker_messages(runtime.settings) == []


def test_while_the_database_is_still_down_the_record_waits(runtime: Runtime, tmp_path: Path) -> None:
    key, _ = _stored_cine(runtime, tmp_path)
    spool_object(runtime.settings, key, None)
    no_tables = Database(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert drain_spool(replace(runtime, db=no_tables)) == 0
    no_tables.dispose()
    assert len(pending(runtime.settings)) == 1
    assert drain_spool(runtime) == 1  # the database is back


def test_an_unreadable_object_drops_its_record_and_keeps_the_bytes(runtime: Runtime) -> None:
    key, _, _ = runtime.store.put_bytes([b"not dicom at all" * 100])
    spool_object(runtime.settings, key, None)
    assert drain_spool(runtime) == 1
    assert pending(runtime.settings) == [] and _instances(runtime) == []
    assert runtime.store.path(key).is_file()  # left in storage for a person to look at


def test_an_unreadable_record_is_skipped(runtime: Runtime, tmp_path: Path) -> None:
    broken = spool_dir(runtime.settings) / "broken.json"
    broken.write_text("{not json")
    key, _ = _stored_cine(runtime, tmp_path)
    spool_object(runtime.settings, key, None)
    assert [json.loads(p.read_text())["key"] for p, _ in pending(runtime.settings)] == [key]
    assert drain_spool(runtime) == 1 and len(_instances(runtime)) == 1
    assert broken.exists()
