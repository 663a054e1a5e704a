"""Rows written straight into a test's database: the situation a test starts from.

Never a transition: jobs and deliveries change state only through :mod:`service.core.lifecycle`,
which is what the tests then exercise. Each writer takes the caller's session (the caller commits).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, UltrasoundMultiFrameImageStorage
from sqlalchemy.orm import Session

from service.core.models import Delivery, DeliveryState, Instance, InstanceState, Job, JobState, Series, Study
from service.core.runtime import Runtime
from tests.factories import noise_cine_file

Row = TypeVar("Row", Instance, Job, Delivery)


def get_row(runtime: Runtime, model: type[Row], row_id: int) -> Row:
    """The row as the database has it now, detached (read its columns after the session ended)."""
    with runtime.db.session() as s:
        row = s.get(model, row_id)
        assert row is not None
        s.expunge(row)
        return row


def add_instance(session: Session) -> int:
    """An accepted US cine in its own study and series (its bytes are not in any store)."""
    study = Study(study_instance_uid="1.2.3")
    session.add(study)
    session.flush()
    series = Series(series_instance_uid="1.2.3.4", study_id=study.id)
    session.add(series)
    session.flush()
    inst = Instance(
        sop_instance_uid="1.2.3.4.5",
        series_id=series.id,
        sop_class_uid=UltrasoundMultiFrameImageStorage,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        storage_key="objects/ab/cd/abcd.dcm",
        sha256="ab" * 32,
        size_bytes=1,
        state=InstanceState.ACCEPTED,
    )
    session.add(inst)
    session.flush()
    return inst.id


def add_job(session: Session, instance_id: int, state: JobState, **values: Any) -> int:
    """A job of the instance in ``state`` (one attempt made unless ``attempts`` says otherwise)."""
    job = Job(instance_id=instance_id, state=state, **({"attempts": 1} | values))
    session.add(job)
    session.flush()
    return job.id


def add_delivery(session: Session, state: DeliveryState, uid: str = "9.9.1", **values: Any) -> int:
    """A SEG's delivery to a PACS in ``state`` (object not stored; one attempt made by default)."""
    defaults: dict[str, Any] = {
        "destination": "PACS@127.0.0.1:104",
        "sop_class_uid": SegmentationStorage,
        "storage_key": "objects/k.dcm",
        "attempts": 1,
    }
    d = Delivery(state=state, sop_instance_uid=uid, **(defaults | values))
    session.add(d)
    session.flush()
    return d.id


def stored_delivery(
    runtime: Runtime,
    folder: Path,
    destination: str,
    *,
    seed: int = 0,
    state: DeliveryState = DeliveryState.PENDING,
    study_uid: str | None = None,
    file: Path | None = None,
) -> tuple[int, str]:
    """A noise cine (JPEG for odd seeds), or ``file``, in the store with its outbox row:
    (delivery ID, SOP UID).

    ``study_uid`` puts the row in that study's line to its destination (none by default)."""
    f = file or noise_cine_file(folder / f"obj{seed}.dcm", seed=seed, jpeg=bool(seed % 2))
    key, _, _ = runtime.store.put_file(f)
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    with runtime.db.session() as s:
        d = Delivery(
            destination=destination,
            sop_class_uid=ds.SOPClassUID,
            sop_instance_uid=ds.SOPInstanceUID,
            storage_key=key,
            state=state,
            study_uid=study_uid,
        )
        s.add(d)
        s.flush()
        return d.id, str(ds.SOPInstanceUID)
