"""Look-ups shared by the routes, and the row -> response mapping of instances, jobs and results."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api.problems import not_found
from service.api.schemas import JobOut, ModelOut, ResultLinks, ResultOut, ResultSummary
from service.store.models import Instance, Job, Result, Series, Study

API = "/api/v1"


def instance_by_uid(session: Session, uid: str, version: int | None = None) -> Instance:
    """The given version of a SOP instance, or its latest; 404 if absent."""
    stmt = select(Instance).where(Instance.sop_instance_uid == uid)
    if version is not None:
        stmt = stmt.where(Instance.version == version)
    inst = session.scalar(stmt.order_by(Instance.version.desc()).limit(1))
    if inst is None:
        raise not_found("instance")
    return inst


def latest_result(session: Session, instance_id: int, model_version: str | None = None) -> Result | None:
    stmt = select(Result).where(Result.instance_id == instance_id)
    if model_version is not None:
        stmt = stmt.where(Result.model_version == model_version)
    return session.scalar(stmt.order_by(Result.id.desc()).limit(1))


def uids_of(session: Session, instance_id: int) -> tuple[str, int, str, str]:
    """(sop uid, version, series uid, study uid) of an instance row."""
    row = session.execute(
        select(
            Instance.sop_instance_uid, Instance.version, Series.series_instance_uid, Study.study_instance_uid
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Instance.id == instance_id)
    ).one()
    return row[0], row[1], row[2], row[3]


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
    return dict(
        session.execute(select(Result.job_id, Result.id).where(Result.job_id.in_(job_ids))).tuples().all()
    )


def result_summary(r: Result, sop_uid: str, version: int) -> ResultSummary:
    return ResultSummary(
        id=r.id,
        job_id=r.job_id,
        sop_instance_uid=sop_uid,
        instance_version=version,
        score=r.score,
        key_frame=r.key_frame,
        b_line_fraction=r.b_line_fraction,
        b_line_count=r.b_line_count,
        consolidation=r.consolidation,
        effusion=r.effusion,
        model=ModelOut(name=r.model_name, version=r.model_version, weights_sha256=r.weights_sha256),
        created_at=r.created_at,
    )


def result_out(session: Session, r: Result) -> ResultOut:
    sop_uid, version, series_uid, study_uid = uids_of(session, r.instance_id)
    base = f"{API}/results/{r.id}"
    return ResultOut(
        **result_summary(r, sop_uid, version).model_dump(),
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
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


def count_versions(session: Session, uid: str) -> int:
    return int(session.scalar(select(func.count()).where(Instance.sop_instance_uid == uid)) or 0)
