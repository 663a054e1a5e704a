"""Look-ups shared by the routes, and the row -> response mapping of instances, jobs and results."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, bindparam, select
from sqlalchemy.orm import Session

from service.api.problems import not_found
from service.api.schemas import JobOut, ResultLinks, ResultOut
from service.core.models import Instance, Job, Result, Series, Study

API = "/api/v1"


def utc(value: datetime) -> datetime:
    """Filter timestamps in UTC: naive ones are taken as UTC (SQLite compares them as text)."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def instance_by_uid(session: Session, uid: str, version: int | None = None) -> Instance:
    """The given version of a SOP instance, or its latest; 404 if absent."""
    stmt = select(Instance).where(Instance.sop_instance_uid == uid)
    if version is not None:
        stmt = stmt.where(Instance.version == version)
    inst = session.scalar(stmt.order_by(Instance.version.desc()).limit(1))
    if inst is None:
        raise not_found("instance")
    return inst


def job_out(job: Job, sop_uid: str, version: int, result_id: int | None) -> JobOut:
    return JobOut(
        id=job.id,
        sop_instance_uid=sop_uid,
        instance_version=version,
        state=job.state,
        attempts=job.attempts,
        error=job.error,
        model_version=job.model_version,
        timings_ms={k: float(v) for k, v in (job.timings_ms or {}).items() if isinstance(v, int | float)},
        worker=job.worker,
        created_at=job.created_at,
        enqueued_at=job.enqueued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        result_id=result_id,
    )


def job_result_ids(session: Session, job_ids: list[int]) -> dict[int, int]:
    if not job_ids:
        return {}
    return dict(session.execute(select(Result.job_id, Result.id).where(Result.job_id.in_(job_ids))).all())


#: Columns of a result summary; list rows carry these plus the instance's UID and version.
SUMMARY_COLUMNS = (
    Result.id, Result.job_id, Result.score, Result.gradable, Result.ungradable_reason, Result.key_frame,
    Result.b_line_fraction, Result.b_line_count,
    Result.consolidation, Result.effusion, Result.model_name, Result.model_version, Result.weights_sha256,
    Result.model_package_sha256, Result.created_at, Instance.sop_instance_uid, Instance.version,
)  # fmt: skip
_DETAIL_COLUMNS = (
    Result.frame_scores, Result.measurements, Result.seg_sop_instance_uid, Result.seg_storage_key,
    Result.sr_sop_instance_uid, Result.sr_storage_key, Result.sc_sop_instance_uid, Result.sc_storage_key,
    Series.series_instance_uid, Study.study_instance_uid,
)  # fmt: skip


def result_summary(r: Any) -> dict[str, Any]:
    """A :class:`ResultSummary` as a dict, from a row of :data:`SUMMARY_COLUMNS`.

    Plain rows and dicts: the response model validates the whole page in one pass in pydantic-core,
    several times faster than building 50 model objects (or ORM objects) in Python.
    """
    return {
        "id": r.id,
        "job_id": r.job_id,
        "sop_instance_uid": r.sop_instance_uid,
        "instance_version": r.version,
        "score": r.score if r.gradable else None,
        "gradable": r.gradable,
        "reason": r.ungradable_reason,
        "key_frame": r.key_frame,
        "b_line_fraction": r.b_line_fraction,
        "b_line_count": r.b_line_count,
        "consolidation": r.consolidation,
        "effusion": r.effusion,
        "model": {
            "name": r.model_name,
            "version": r.model_version,
            "weights_sha256": r.weights_sha256,
            "package_sha256": r.model_package_sha256,
        },
        "created_at": r.created_at,
    }


def _detail_query() -> Select[*tuple[Any, ...]]:
    return (
        select(*SUMMARY_COLUMNS, *_DETAIL_COLUMNS)
        .select_from(Result)
        .join(Instance, Result.instance_id == Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
    )


_BY_ID = _detail_query().where(Result.id == bindparam("result_id"))
_LATEST_VERSION = (
    select(Instance.id)
    .where(Instance.sop_instance_uid == bindparam("uid"))
    .order_by(Instance.version.desc())
    .limit(1)
    .scalar_subquery()
)
#: The common case prebuilt: building a 24-column statement per request costs more than running it.
_LATEST_BY_UID = (
    _detail_query().where(Result.instance_id == _LATEST_VERSION).order_by(Result.id.desc()).limit(1)
)


def result_by_id(session: Session, result_id: int) -> Any:
    """One query for the result and the UIDs around it (the hot path of dashboards)."""
    row = session.connection().execute(_BY_ID, {"result_id": result_id}).first()
    if row is None:
        raise not_found("result")
    return row


def latest_result_by_uid(session: Session, uid: str, version: int | None, model_version: str | None) -> Any:
    """The latest result of (the given or latest version of) a SOP instance, in one query."""
    if version is None and model_version is None:
        # Core execution: these are plain column rows, the ORM layer would only add overhead.
        row = session.connection().execute(_LATEST_BY_UID, {"uid": uid}).first()
    else:
        inst = select(Instance.id).where(Instance.sop_instance_uid == uid)
        if version is not None:
            inst = inst.where(Instance.version == version)
        stmt = _detail_query().where(
            Result.instance_id == inst.order_by(Instance.version.desc()).limit(1).scalar_subquery()
        )
        if model_version is not None:
            stmt = stmt.where(Result.model_version == model_version)
        row = session.execute(stmt.order_by(Result.id.desc()).limit(1)).first()
    if row is None:
        instance_by_uid(session, uid, version)  # 404 for the instance if that is what is missing
        raise not_found("result of this instance")
    return row


def result_out(r: Any) -> ResultOut:
    """From a row of the detail query."""
    base = f"{API}/results/{r.id}"
    return ResultOut(
        **result_summary(r),
        series_instance_uid=r.series_instance_uid,
        study_instance_uid=r.study_instance_uid,
        frame_scores=[int(s) for s in r.frame_scores or []],
        measurements=r.measurements or {},
        seg_sop_instance_uid=r.seg_sop_instance_uid,
        sr_sop_instance_uid=r.sr_sop_instance_uid,
        sc_sop_instance_uid=r.sc_sop_instance_uid,
        links=ResultLinks(
            seg=f"{base}/seg" if r.seg_storage_key else None,
            sr=f"{base}/sr" if r.sr_storage_key else None,
            preview_png=f"{base}/preview.png",
            cine_gif=f"{base}/cine.gif",
            cine_webp=f"{base}/cine.webp",
        ),
    )
