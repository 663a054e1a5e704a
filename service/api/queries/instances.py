"""Instances: the list, one version by UID, and the job and score shown beside each."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service.api.pagination import SortKey, Sorts
from service.api.queries import found
from service.api.queries.filters import equal, period
from service.api.schemas import InstanceFilter, InstanceOut, from_row
from service.core.models import Instance, Job, Result, Series, Study
from service.core.study import latest_results

SORTS = Sorts(
    {"received_at": SortKey(Instance.received_at, "datetime"), "id": SortKey(Instance.id, "int")}, Instance.id
)


def instance_by_uid(session: Session, uid: str, version: int | None = None) -> Instance:
    """The given version of a SOP instance, or its latest; 404 if absent."""
    stmt = select(Instance).where(Instance.sop_instance_uid == uid)
    if version is not None:
        stmt = stmt.where(Instance.version == version)
    return found(session.scalar(stmt.order_by(Instance.version.desc()).limit(1)), "instance")


def select_instances(f: InstanceFilter) -> Select[*tuple[Any, ...]]:
    """Rows of (Instance, series_instance_uid, study_instance_uid)."""
    return (
        select(Instance, Series.series_instance_uid, Study.study_instance_uid)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(
            *equal(f, Study.study_instance_uid, Study.patient_id, Study.accession_number),
            *equal(f, Series.series_instance_uid, Instance.calling_ae, Instance.state),
            *period(Instance.received_at, f.received_from, f.received_to),
        )
    )


def parent_uids(session: Session, inst: Instance) -> tuple[str, str]:
    """(series_instance_uid, study_instance_uid) of ``inst``."""
    row = session.execute(
        select(Series.series_instance_uid, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(Series.id == inst.series_id)
    ).one()
    return row[0], row[1]


def _jobs_and_scores(session: Session, ids: list[int]) -> tuple[dict[int, Job], dict[int, int | None]]:
    """The latest job and the latest result's score by instance id (None: not gradable)."""
    if not ids:
        return {}, {}
    jobs: dict[int, Job] = {}
    for j in session.scalars(select(Job).where(Job.instance_id.in_(ids)).order_by(Job.id)):
        jobs[j.instance_id] = j
    results = latest_results(
        session.execute(
            select(Result.id, Result.instance_id, Result.score).where(Result.instance_id.in_(ids))
        )
    )
    return jobs, {iid: r.score for iid, r in results.items()}


def instances_out(session: Session, rows: Sequence[tuple[Instance, str, str]]) -> list[InstanceOut]:
    """Bodies of (instance, series UID, study UID) rows, each with its latest job and score."""
    jobs, scores = _jobs_and_scores(session, [inst.id for inst, _, _ in rows])
    return [
        from_row(
            InstanceOut,
            inst,
            series_instance_uid=series_uid,
            study_instance_uid=study_uid,
            latest_job=jobs.get(inst.id),  # a JobSummary from the Job's attributes
            score=scores.get(inst.id),
        )
        for inst, series_uid, study_uid in rows
    ]
