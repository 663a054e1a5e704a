"""Jobs: the list, one job by id, and the result each one produced."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service.api.pagination import SortKey, Sorts
from service.api.queries import found
from service.api.queries.filters import equal, period
from service.api.schemas import JobFilter, JobOut, from_row
from service.core.models import Instance, Job, Result

SORTS = Sorts({"created_at": SortKey(Job.created_at, "datetime"), "id": SortKey(Job.id, "int")}, Job.id)


def select_jobs(f: JobFilter) -> Select[*tuple[Any, ...]]:
    """Rows of (Job, sop_instance_uid, version)."""
    return (
        select(Job, Instance.sop_instance_uid, Instance.version)
        .join(Instance, Job.instance_id == Instance.id)
        .where(
            *equal(f, Job.state, Instance.sop_instance_uid, Job.model_version),
            *period(Job.created_at, f.created_from, f.created_to),
        )
    )


def job_by_id(session: Session, job_id: int) -> tuple[Job, Instance]:
    """The job and its instance; 404 if absent."""
    job = found(session.get(Job, job_id), "job")
    return job, job.instance


def job_result_ids(session: Session, job_ids: list[int]) -> dict[int, int]:
    if not job_ids:
        return {}
    return dict(session.execute(select(Result.job_id, Result.id).where(Result.job_id.in_(job_ids))).all())


def job_out(job: Job, sop_uid: str, version: int, result_id: int | None) -> JobOut:
    return from_row(
        JobOut,
        job,
        sop_instance_uid=sop_uid,
        instance_version=version,
        timings_ms={k: float(v) for k, v in (job.timings_ms or {}).items() if isinstance(v, int | float)},
        result_id=result_id,
    )
