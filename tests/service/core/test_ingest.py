"""The one ingest path, called as the SCP and the upload endpoint call it: every outcome, every
refusal with its DIMSE status, the temporary file consumed on every path, and the job sent to the
broker only after its row is committed."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import replace
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, UltrasoundMultiFrameImageStorage
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from service.core import lifecycle
from service.core.db import Database
from service.core.dicom import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATA_SET_MISMATCH,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
)
from service.core.header import RejectedObject
from service.core.ingest import ingest_file
from service.core.models import Instance, InstanceState, Job, JobState
from service.core.queue import ANALYZE_TASK, TaskQueue
from service.core.runtime import Runtime
from tests.conftest import broker_messages
from tests.factories import MALFORMED_HEADERS, cine, malformed_header_cine, save


def _tmp(runtime: Runtime, ds: Dataset) -> Path:
    """``ds`` as a finished temporary file in the store, as a receive leaves it."""
    return save(ds, runtime.store.new_temp())


def _instances(runtime: Runtime) -> list[Instance]:
    with runtime.db.session() as s:
        rows = list(s.scalars(select(Instance).order_by(Instance.id)))
        s.expunge_all()
        return rows


def _jobs(runtime: Runtime) -> list[Job]:
    with runtime.db.session() as s:
        rows = list(s.scalars(select(Job).order_by(Job.id)))
        s.expunge_all()
        return rows


def _queued(runtime: Runtime) -> list[int]:
    return [m.args[0] for m in broker_messages(runtime.settings) if m.task == ANALYZE_TASK]


def _stored(runtime: Runtime) -> list[Path]:
    return sorted((runtime.store.root / "objects").rglob("*.dcm"))


def _with(runtime: Runtime, **settings: object) -> Runtime:
    """The same database, store and queue under other settings."""
    return replace(runtime, settings=runtime.settings.model_copy(update=settings))


def test_a_lung_cine_is_stored_indexed_and_queued(runtime: Runtime) -> None:
    ds = cine("raw", frames=3)
    tmp = _tmp(runtime, ds)
    sent = tmp.read_bytes()

    out = ingest_file(tmp, calling_ae="SCANNER", runtime=runtime)

    assert (out.outcome, out.sop_instance_uid, out.version) == ("queued", ds.SOPInstanceUID, 1)
    assert not tmp.exists()
    [inst] = _instances(runtime)
    assert (inst.id, inst.state, inst.calling_ae, inst.frames) == (
        out.instance_id,
        InstanceState.ACCEPTED,
        "SCANNER",
        3,
    )
    assert runtime.store.path(inst.storage_key).read_bytes() == sent
    assert inst.sha256 == hashlib.sha256(sent).hexdigest() and inst.size_bytes == len(sent)
    [job] = _jobs(runtime)
    assert job.id == out.job_id and job.state == JobState.QUEUED and job.enqueued_at is not None
    assert _queued(runtime) == [job.id]


def test_routing_stores_but_does_not_analyse(runtime: Runtime) -> None:
    chest_only = _with(runtime, route_body_part="^CHEST$")
    tmp = _tmp(runtime, cine("raw", frames=2, body_part="HEART"))
    out = ingest_file(tmp, calling_ae=None, runtime=chest_only)
    assert (out.outcome, out.job_id) == ("ignored", None)
    assert out.reason == "body part does not match the routing rule"
    other = ingest_file(_tmp(runtime, cine("raw", frames=2, modality="OT")), calling_ae=None, runtime=runtime)
    assert (other.outcome, other.reason) == ("ignored", "modality is not US")
    assert not tmp.exists()
    assert [i.state for i in _instances(runtime)] == [InstanceState.IGNORED] * 2
    assert _jobs(runtime) == [] and _queued(runtime) == [] and len(_stored(runtime)) == 2


def test_the_same_bytes_again_are_a_duplicate(runtime: Runtime) -> None:
    ds = cine("raw", frames=2)
    first = ingest_file(_tmp(runtime, ds), calling_ae=None, runtime=runtime)
    again_tmp = _tmp(runtime, ds)
    again = ingest_file(again_tmp, calling_ae=None, runtime=runtime)
    assert (again.outcome, again.instance_id, again.version) == ("duplicate", first.instance_id, 1)
    assert (again.job_id, again.reason) == (None, "same bytes")
    assert not again_tmp.exists()
    assert len(_instances(runtime)) == 1 and len(_jobs(runtime)) == 1 and len(_queued(runtime)) == 1


def test_other_bytes_under_the_same_uid_are_a_new_version(runtime: Runtime) -> None:
    first = cine("raw", frames=2, seed=1)
    second = cine(
        "raw",
        frames=2,
        seed=2,
        sop_uid=first.SOPInstanceUID,
        study_uid=first.StudyInstanceUID,
        series_uid=first.SeriesInstanceUID,
    )
    a = ingest_file(_tmp(runtime, first), calling_ae=None, runtime=runtime)
    b = ingest_file(_tmp(runtime, second), calling_ae=None, runtime=runtime)
    assert (a.version, b.version) == (1, 2) and b.outcome == "queued"
    assert a.instance_id != b.instance_id and a.job_id != b.job_id
    v1, v2 = _instances(runtime)
    assert v1.sha256 != v2.sha256 and len(_stored(runtime)) == 2  # nothing overwritten
    assert _queued(runtime) == [a.job_id, b.job_id]


def _refused(runtime: Runtime, tmp: Path, **kw: object) -> RejectedObject:
    with pytest.raises(RejectedObject) as refused:
        ingest_file(tmp, calling_ae=None, runtime=runtime, **kw)  # type: ignore[arg-type]
    assert not tmp.exists()
    assert _instances(runtime) == [] and _stored(runtime) == [] and _queued(runtime) == []
    return refused.value


def test_another_sop_class_is_refused_by_default(runtime: Runtime) -> None:
    ct = cine("raw", frames=1, sop_class=CTImageStorage, modality="CT")
    exc = _refused(runtime, _tmp(runtime, ct))
    assert (exc.dimse_status, exc.http_status) == (STATUS_SOP_CLASS_NOT_SUPPORTED, 415)


def test_another_sop_class_is_kept_and_ignored_when_configured(runtime: Runtime) -> None:
    ct = cine("raw", frames=1, sop_class=CTImageStorage, modality="CT")
    out = ingest_file(
        _tmp(runtime, ct), calling_ae=None, runtime=_with(runtime, unsupported_sop_class="ignore")
    )
    assert (out.outcome, out.reason) == ("ignored", "not an ultrasound image SOP class")


def test_uids_other_than_the_request_announced_are_a_mismatch(runtime: Runtime) -> None:
    ds = cine("raw", frames=2)
    announced = (UltrasoundMultiFrameImageStorage, "1.2.826.0.1.3680043.2.1143.999")
    exc = _refused(runtime, _tmp(runtime, ds), announced=announced)
    assert exc.dimse_status == STATUS_DATA_SET_MISMATCH
    matching = (str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert (
        ingest_file(_tmp(runtime, ds), calling_ae=None, runtime=runtime, announced=matching).outcome
        == "queued"
    )


def test_an_image_that_does_not_add_up_is_a_mismatch(runtime: Runtime) -> None:
    ds = cine("raw", frames=4)
    ds.NumberOfFrames = 5  # more frames than pixel data
    assert _refused(runtime, _tmp(runtime, ds)).dimse_status == STATUS_DATA_SET_MISMATCH


def test_bytes_that_are_not_dicom_cannot_be_understood(runtime: Runtime) -> None:
    tmp = runtime.store.new_temp()
    tmp.write_bytes(b"not dicom at all" * 100)
    assert _refused(runtime, tmp).dimse_status & 0xF000 == STATUS_CANNOT_UNDERSTAND


@pytest.mark.parametrize("case", MALFORMED_HEADERS)
def test_a_header_pydicom_cannot_parse_is_refused_not_an_error(runtime: Runtime, case: str) -> None:
    tmp = runtime.store.new_temp()
    tmp.write_bytes(malformed_header_cine(case))
    refused = _refused(runtime, tmp)
    assert refused.dimse_status == STATUS_CANNOT_UNDERSTAND and "unreadable" in refused.reason


def test_a_digest_from_the_receive_is_trusted_not_recomputed(runtime: Runtime) -> None:
    tmp = _tmp(runtime, cine("raw", frames=2))
    size = tmp.stat().st_size
    out = ingest_file(tmp, calling_ae=None, runtime=runtime, digest=("ab" * 32, size))
    [inst] = _instances(runtime)
    assert inst.id == out.instance_id and (inst.sha256, inst.size_bytes) == ("ab" * 32, size)


class SpyQueue(TaskQueue):
    """Records, at the moment of each send, what another connection sees of the job."""

    def __init__(self, runtime: Runtime) -> None:
        super().__init__(runtime.settings)
        self.db = runtime.db
        self.seen: list[tuple[JobState, bool] | None] = []

    def enqueue_analysis(self, job_id: int) -> None:
        with self.db.session() as s:
            job = s.get(Job, job_id)
            self.seen.append(None if job is None else (job.state, job.enqueued_at is not None))
        super().enqueue_analysis(job_id)


class DownQueue(TaskQueue):
    def enqueue_analysis(self, job_id: int) -> None:
        raise ConnectionRefusedError("broker down")


def test_the_job_is_sent_only_after_its_row_is_committed(runtime: Runtime) -> None:
    spy = SpyQueue(runtime)
    out = ingest_file(
        _tmp(runtime, cine("raw", frames=2)), calling_ae=None, runtime=replace(runtime, queue=spy)
    )
    assert spy.seen == [(JobState.QUEUED, False)]  # a worker picking it up at once finds the row
    [job] = _jobs(runtime)
    assert job.id == out.job_id and job.enqueued_at is not None  # stamped after the send


def test_a_broker_that_is_down_leaves_the_job_queued_for_recovery(
    runtime: Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger=lifecycle.__name__)
    down = replace(runtime, queue=DownQueue(runtime.settings))
    out = ingest_file(_tmp(runtime, cine("raw", frames=2)), calling_ae=None, runtime=down)
    assert out.outcome == "queued"  # the object is safe: the sender gets Success
    [job] = _jobs(runtime)
    assert job.state == JobState.QUEUED and job.enqueued_at is None  # what requeue_stale looks for
    assert _queued(runtime) == []
    assert "broker unavailable" in caplog.text


def test_a_database_error_after_storing_names_the_stored_object(runtime: Runtime, tmp_path: Path) -> None:
    """The SCP spools the object under that key instead of asking the sender to retry."""
    no_tables = Database(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    tmp = _tmp(runtime, cine("raw", frames=2))
    with pytest.raises(SQLAlchemyError) as failed:
        ingest_file(tmp, calling_ae=None, runtime=replace(runtime, db=no_tables))
    no_tables.dispose()
    key = failed.value.lusai_storage_key  # type: ignore[attr-defined]
    assert runtime.store.path(key).is_file() and not tmp.exists()
