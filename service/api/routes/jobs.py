"""Analysis jobs: state, attempts, per-stage timings, errors; cancel."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from service.api.deps import DbSession, read_scope, write_scope
from service.api.pagination import Cursor, Limit, paginate
from service.api.problems import ProblemError, responses
from service.api.queries.jobs import SORTS, job_by_id, job_out, job_result_ids, select_jobs
from service.api.schemas import JobFilter, JobOut, Page
from service.core import lifecycle

router = APIRouter(prefix="/api/v1", tags=["jobs"])
JobId = Annotated[int, Path(ge=1, le=2**62, description="Job ID")]


@router.get(
    "/jobs",
    response_model=Page[JobOut],
    summary="List analysis jobs",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_jobs(
    session: DbSession,
    filters: Annotated[JobFilter, Query()],
    sort: Annotated[str, Query(pattern=SORTS.pattern)] = "-id",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[JobOut]:
    page = paginate(session, select_jobs(filters), cursor, limit, SORTS.order(sort))
    results = job_result_ids(session, [r.Job.id for r in page.rows])
    return Page[JobOut](
        items=[job_out(r.Job, r.sop_instance_uid, r.version, results.get(r.Job.id)) for r in page.rows],
        next_cursor=page.next_cursor,
        limit=limit,
    )


@router.get(
    "/jobs/{job_id}", response_model=JobOut, summary="One job", dependencies=[Depends(read_scope)],
    responses=responses(404),
)  # fmt: skip
def get_job(job_id: JobId, session: DbSession) -> JobOut:
    job, inst = job_by_id(session, job_id)
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
    job, inst = job_by_id(session, job_id)
    if not lifecycle.cancel(session, job.id):
        raise ProblemError(409, "job-finished", f"the job is already {job.state.value}")
    session.commit()
    return job_out(job, inst.sop_instance_uid, inst.version, job_result_ids(session, [job.id]).get(job.id))
