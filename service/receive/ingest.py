"""The one ingest path shared by the C-STORE SCP, the upload endpoint and the tools.

A finished temporary file goes in; out come a content-addressed stored object, Study/Series/Instance
rows and, for lung-ultrasound cines, a Job that is enqueued only after the rows are committed
(Celery's rule: enqueue after commit, so a worker never looks for a row that is not there yet).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from service.core.db import session_scope
from service.core.logs import ctx
from service.core.models import Instance, InstanceState, Job, JobState, Series, Study
from service.core.queue import enqueue_analysis
from service.core.settings import Settings
from service.core.storage import ObjectStore
from service.receive.routing import RoutingRules
from service.receive.validate import (
    STATUS_DATA_SET_MISMATCH,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    US_SOP_CLASSES,
    Header,
    RejectedObject,
    check_image,
    read_header,
)

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
    settings: Settings,
    store: ObjectStore,
    digest: tuple[str, int] | None = None,
    announced: tuple[str, str] | None = None,
) -> IngestOutcome:
    """Validate, store and index ``tmp`` (consumed: moved into storage or deleted).

    ``digest`` is the (SHA-256, size) computed while the bytes arrived, so the object is not read
    twice; ``tmp`` must then already be fsynced. ``announced`` is the (SOP Class, SOP Instance) UID
    pair of the C-STORE request, which the data set must repeat.
    """
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
        key, sha, size = store.adopt(tmp) if digest is None else adopt_hashed(store, tmp, *digest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:
        outcome = index_object(
            header, key, sha, size, calling_ae=calling_ae, ignore_reason=ignore_reason, settings=settings
        )
    except SQLAlchemyError as exc:
        exc.lusai_storage_key = key  # type: ignore[attr-defined]  # lets the SCP spool it
        raise
    if outcome.job_id is not None:
        try:
            enqueue_job(outcome.job_id, settings)
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


def adopt_hashed(store: ObjectStore, tmp: Path, sha: str, size: int) -> tuple[str, str, int]:
    """Rename an already hashed and fsynced temporary file into content-addressed storage.

    The key comes from the hash alone; identical bytes already stored make this a no-op.
    """
    key = store.key_for(sha)
    final = store.path(key)
    new_dirs = not final.parent.is_dir()
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():
        tmp.unlink(missing_ok=True)
    else:
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        if new_dirs:  # objects/ab/cd just created: their own entries must be durable too
            _fsync_dir(final.parent.parent)
            _fsync_dir(final.parent.parent.parent)
    return key, sha, size


def _fsync_dir(directory: Path) -> None:
    """Make the rename itself durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def index_object(
    header: Header,
    key: str,
    sha: str,
    size: int,
    *,
    calling_ae: str | None,
    ignore_reason: str | None,
    settings: Settings,
) -> IngestOutcome:
    """Rows for a stored object; retried once on a race with a concurrent sender of the same study."""
    for attempt in range(2):
        try:
            with session_scope(settings.db_url) as session:
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
    job = Job(instance_id=instance.id, state=JobState.QUEUED)
    session.add(job)
    session.flush()
    return IngestOutcome("queued", h.sop_instance_uid, instance.id, version, job_id=job.id)


def enqueue_job(job_id: int, settings: Settings) -> bool:
    """Send the job to the broker; a broker outage leaves it QUEUED for the recovery sweep."""
    try:
        enqueue_analysis(job_id)
    except Exception as exc:  # broker down: the row is the truth, recovery re-sends it
        log.warning(
            "broker unavailable, job left for recovery", extra=ctx(job_id=job_id, error=type(exc).__name__)
        )
        return False
    with session_scope(settings.db_url) as session:  # one UPDATE, no ORM load: this runs per object
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.enqueued_at.is_(None))
            .values(enqueued_at=datetime.now(UTC))
        )
    return True
