"""Analysis jobs: state, attempts, per-stage timings, errors; cancel."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import DbSession, read_scope, write_scope
from service.api.pagination import MAX_LIMIT, SortKey, next_cursor, paginate, sort_pattern
from service.api.problems import ProblemError, not_found, responses
from service.api.queries import job_out, job_result_ids, utc
from service.api.schemas import UID_PATTERN, IsoDateTime, JobOut, Page
from service.core.models import Instance, Job, JobState

router = APIRouter(prefix="/api/v1", tags=["jobs"])
JobId = Annotated[int, Path(ge=1, le=2**62, description="Job ID")]
_SORTS = {"created_at": SortKey(Job.created_at, "datetime"), "id": SortKey(Job.id, "int")}
CANCELLABLE = (JobState.QUEUED, JobState.RETRYING, JobState.RUNNING)


@router.get(
    "/jobs",
    response_model=Page[JobOut],
    summary="List analysis jobs",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_jobs(
    session: DbSession,
    state: JobState | None = None,
    sop_instance_uid: Annotated[str | None, Query(pattern=UID_PATTERN, max_length=64)] = None,
    model_version: Annotated[str | None, Query(max_length=64)] = None,
    created_from: Annotated[IsoDateTime | None, Query(description="Created at or after (ISO 8601).")] = None,
    created_to: Annotated[IsoDateTime | None, Query(description="Created before (ISO 8601).")] = None,
    sort: Annotated[str, Query(pattern=sort_pattern(list(_SORTS)))] = "-id",
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> Page[JobOut]:
    stmt = select(Job, Instance.sop_instance_uid, Instance.version).join(
        Instance, Job.instance_id == Instance.id
    )
    if state is not None:
        stmt = stmt.where(Job.state == state)
    if sop_instance_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_instance_uid)
    if model_version is not None:
        stmt = stmt.where(Job.model_version == model_version)
    if created_from is not None:
        stmt = stmt.where(Job.created_at >= utc(created_from))
    if created_to is not None:
        stmt = stmt.where(Job.created_at < utc(created_to))
    stmt, _, _ = paginate(stmt, sort=sort, keys=_SORTS, id_col=Job.id, cursor=cursor, limit=limit)
    rows = session.execute(stmt).all()
    page = rows[:limit]
    results = job_result_ids(session, [j.id for j, _, _ in page])
    attr = sort.lstrip("-")
    return Page[JobOut](
        items=[job_out(j, uid, v, results.get(j.id)) for j, uid, v in page],
        next_cursor=next_cursor(rows, limit, sort, lambda r: getattr(r[0], attr), lambda r: r[0].id),
        limit=limit,
    )


def _load(session: Session, job_id: int) -> tuple[Job, Instance]:
    job = session.get(Job, job_id)
    if job is None:
        raise not_found("job")
    return job, job.instance


@router.get(
    "/jobs/{job_id}", response_model=JobOut, summary="One job", dependencies=[Depends(read_scope)],
    responses=responses(404),
)  # fmt: skip
def get_job(job_id: JobId, session: DbSession) -> JobOut:
    job, inst = _load(session, job_id)
    return job_out(job, inst.sop_instance_uid, inst.version, job_result_ids(session, [job.id]).get(job.id))


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobOut,
    summary="Cancel a queued, retrying or running job",
    description="A running job is marked cancelled; its worker discards the outcome when it finishes.",
    dependencies=[Depends(write_scope)],
    responses=responses(404, 409),
)
def cancel_job(job_id: JobId, session: DbSession) -> JobOut:
    job, inst = _load(session, job_id)
    if job.state not in CANCELLABLE:
        raise ProblemError(409, "job-finished", f"the job is already {job.state.value}")
    job.state = JobState.CANCELLED
    job.finished_at = datetime.now(UTC)
    session.commit()
    return job_out(job, inst.sop_instance_uid, inst.version, job_result_ids(session, [job.id]).get(job.id))
