"""The one ingest path shared by the C-STORE SCP, the upload endpoint and the tools.

A finished temporary file goes in; out come a content-addressed stored object, Study/Series/Instance
rows and, for lung-ultrasound cines, a Job that is enqueued only after the rows are committed
(Celery's rule: enqueue after commit, so a worker never looks for a row that is not there yet).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from service.core import lifecycle
from service.core.db import Database
from service.core.dicom import STATUS_DATA_SET_MISMATCH, STATUS_SOP_CLASS_NOT_SUPPORTED, US_SOP_CLASSES
from service.core.header import (
    Header,
    RejectedObject,
    check_image,
    read_header,
)
from service.core.logs import ctx
from service.core.models import Instance, InstanceState, Series, Study
from service.core.routing import RoutingRules
from service.core.runtime import Runtime
from service.core.settings import Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class IngestOutcome:
    """What happened to one object; ``outcome`` is queued, ignored or duplicate."""

    outcome: str
    sop_instance_uid: str
    instance_id: int
    version: int
    job_id: int | None = None
    reason: str | None = None


def rules_from(settings: Settings) -> RoutingRules:
    return RoutingRules(
        body_part=settings.route_body_part,
        description=settings.route_description,
        calling_ae=settings.route_calling_ae,
    )


def ingest_file(
    tmp: Path,
    *,
    calling_ae: str | None,
    runtime: Runtime,
    digest: tuple[str, int] | None = None,
    announced: tuple[str, str] | None = None,
) -> IngestOutcome:
    """Validate, store and index ``tmp`` (consumed: moved into storage or deleted).

    ``digest`` is the (SHA-256, size) computed while the bytes arrived, so the object is not read
    twice; ``tmp`` must then already be fsynced. ``announced`` is the (SOP Class, SOP Instance) UID
    pair of the C-STORE request, which the data set must repeat.
    """
    settings = runtime.settings
    try:
        header, ds = read_header(tmp)
        if announced is not None and (header.sop_class_uid, header.sop_instance_uid) != announced:
            # PS3.4 B.2.3: the data set does not match what the request said it is.
            raise RejectedObject("data set UIDs differ from the C-STORE request", STATUS_DATA_SET_MISMATCH)
        ignore_reason: str | None = None
        if header.sop_class_uid not in US_SOP_CLASSES and settings.unsupported_sop_class == "reject":
            raise RejectedObject("SOP class not supported", STATUS_SOP_CLASS_NOT_SUPPORTED, 415)
        ignore_reason = rules_from(settings).decide(header, calling_ae)
        if ignore_reason is None:
            check_image(header, ds, tmp)
        del ds
        key, sha, size = runtime.store.adopt(tmp, digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        outcome = index_object(
            header, key, sha, size, calling_ae=calling_ae, ignore_reason=ignore_reason, db=runtime.db
        )
    except SQLAlchemyError as exc:
        exc.lusai_storage_key = key  # type: ignore[attr-defined]  # lets the SCP spool it
        raise
    if outcome.job_id is not None:
        try:
            enqueue_job(outcome.job_id, runtime)
        except SQLAlchemyError as exc:  # rows are committed: recovery re-sends jobs never marked enqueued
            log.warning(
                "job enqueue bookkeeping failed", extra=ctx(job_id=outcome.job_id, error=type(exc).__name__)
            )
    log.info(
        "object received",
        extra=ctx(
            outcome=outcome.outcome,
            instance_id=outcome.instance_id,  # UIDs can carry dates and site codes: not logged
            version=outcome.version,
            job_id=outcome.job_id,
            calling_ae=calling_ae,
            frames=header.frames,
            bytes=size,
            reason=outcome.reason,
        ),
    )
    return outcome


def index_object(
    header: Header,
    key: str,
    sha: str,
    size: int,
    *,
    calling_ae: str | None,
    ignore_reason: str | None,
    db: Database,
) -> IngestOutcome:
    """Rows for a stored object; retried once on a race with a concurrent sender of the same study."""
    for attempt in range(2):
        try:
            with db.session() as session:
                return _index(session, header, key, sha, size, calling_ae, ignore_reason)
        except IntegrityError:
            if attempt:
                raise
    raise AssertionError("unreachable")


def _index(
    session: Session,
    h: Header,
    key: str,
    sha: str,
    size: int,
    calling_ae: str | None,
    ignore_reason: str | None,
) -> IngestOutcome:
    existing = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == h.sop_instance_uid, Instance.sha256 == sha)
    )
    if existing is not None:
        return IngestOutcome(
            "duplicate", h.sop_instance_uid, existing.id, existing.version, reason="same bytes"
        )

    study = session.scalar(select(Study).where(Study.study_instance_uid == h.study_instance_uid))
    if study is None:
        study = Study(
            study_instance_uid=h.study_instance_uid,
            patient_id=h.patient_id,
            accession_number=h.accession_number,
            study_date=h.study_date,
            study_description=h.study_description,
        )
        session.add(study)
        session.flush()
    series = session.scalar(select(Series).where(Series.series_instance_uid == h.series_instance_uid))
    if series is None:
        series = Series(
            series_instance_uid=h.series_instance_uid,
            study_id=study.id,
            modality=h.modality,
            series_number=h.series_number,
            series_description=h.series_description,
            body_part=h.body_part,
        )
        session.add(series)
        session.flush()
    last = session.scalar(
        select(func.max(Instance.version)).where(Instance.sop_instance_uid == h.sop_instance_uid)
    )
    version = (last or 0) + 1
    instance = Instance(
        sop_instance_uid=h.sop_instance_uid,
        version=version,
        series_id=series.id,
        sop_class_uid=h.sop_class_uid,
        transfer_syntax_uid=h.transfer_syntax_uid,
        frames=h.frames,
        rows=h.rows,
        columns=h.columns,
        photometric=h.photometric,
        calling_ae=calling_ae,
        storage_key=key,
        sha256=sha,
        size_bytes=size,
        state=InstanceState.IGNORED if ignore_reason else InstanceState.ACCEPTED,
        ignore_reason=ignore_reason,
    )
    session.add(instance)
    session.flush()
    if ignore_reason:
        return IngestOutcome("ignored", h.sop_instance_uid, instance.id, version, reason=ignore_reason)
    job = lifecycle.new_job(session, instance.id)
    return IngestOutcome("queued", h.sop_instance_uid, instance.id, version, job_id=job.id)


def enqueue_job(job_id: int, runtime: Runtime) -> bool:
    """Send the job to the broker; a broker outage leaves it QUEUED for the recovery sweep."""
    with runtime.db.session() as session:  # one UPDATE, no ORM load: this runs per object
        return lifecycle.enqueue(session, job_id, runtime.queue.enqueue_analysis)
