"""Studies and series: the lists, one of each by UID, their counts, and a study's clips to score."""

from __future__ import annotations

from datetime import date
from typing import Any

from sqlalchemy import Select, exists, func, select
from sqlalchemy.orm import Session

from service.api.pagination import SortKey, Sorts
from service.api.queries import found
from service.api.queries.filters import between, equal
from service.api.schemas import SeriesFilter, SeriesOut, StudyFilter, StudyOut, from_row
from service.core.models import Instance, Job, Result, Series, Study
from service.core.study import Clip, ZoneRule, graded_score, latest_results, latest_versions

STUDY_SORTS = Sorts(
    {
        "study_date": SortKey(func.coalesce(Study.study_date, ""), "str"),
        "created_at": SortKey(Study.created_at, "datetime"),
    },
    Study.id,
)
SERIES_SORTS = Sorts(
    {
        "series_number": SortKey(func.coalesce(Series.series_number, -1), "int"),
        "created_at": SortKey(Series.created_at, "datetime"),
    },
    Series.id,
)


def _dicom(d: date | None) -> str | None:
    return d.strftime("%Y%m%d") if d is not None else None


def select_studies(f: StudyFilter) -> Select[*tuple[Any, ...]]:
    """Rows of (Study,); the instance filters match studies with at least one such instance."""
    stmt = select(Study).where(
        *equal(f, Study.patient_id, Study.accession_number),
        *between(Study.study_date, _dicom(f.date_from), _dicom(f.date_to)),
    )
    inst_of_study = (
        select(Instance.id).join(Series, Instance.series_id == Series.id).where(Series.study_id == Study.id)
    )
    if f.calling_ae is not None:
        stmt = stmt.where(exists(inst_of_study.where(Instance.calling_ae == f.calling_ae)))
    if f.job_state is not None:
        stmt = stmt.where(
            exists(inst_of_study.join(Job, Job.instance_id == Instance.id).where(Job.state == f.job_state))
        )
    if f.score_min is not None or f.score_max is not None:
        scored = inst_of_study.join(Result, Result.instance_id == Instance.id)
        stmt = stmt.where(exists(scored.where(*between(Result.score, f.score_min, f.score_max))))
    return stmt


def study_by_uid(session: Session, uid: str) -> Study:
    return found(session.scalar(select(Study).where(Study.study_instance_uid == uid)), "study")


def study_counts(session: Session, ids: list[int]) -> tuple[dict[int, int], dict[int, int]]:
    """(series count, instance count) by study id."""
    if not ids:
        return {}, {}
    series = dict(
        session.execute(
            select(Series.study_id, func.count()).where(Series.study_id.in_(ids)).group_by(Series.study_id)
        ).all()
    )
    inst = dict(
        session.execute(
            select(Series.study_id, func.count(Instance.id))
            .join(Instance, Instance.series_id == Series.id)
            .where(Series.study_id.in_(ids))
            .group_by(Series.study_id)
        ).all()
    )
    return series, inst


def _dicom_date(d: str | None) -> str | None:
    if d and len(d) == 8 and d.isdigit():
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return d or None


def study_out(s: Study, series_n: int, inst_n: int) -> StudyOut:
    return from_row(
        StudyOut, s, study_date=_dicom_date(s.study_date), series_count=series_n, instance_count=inst_n
    )


def series_of_study(session: Session, study_id: int) -> list[Series]:
    return list(
        session.scalars(
            select(Series).where(Series.study_id == study_id).order_by(Series.series_number, Series.id)
        )
    )


def select_series(f: SeriesFilter) -> Select[*tuple[Any, ...]]:
    """Rows of (Series, study_instance_uid); the zone is derived, so it is filtered on the page."""
    return (
        select(Series, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(*equal(f, Study.study_instance_uid, Series.modality))
    )


def series_by_uid(session: Session, uid: str) -> Any:
    """The row of :func:`select_series` of one series; 404 if absent."""
    row = session.execute(select_series(SeriesFilter()).where(Series.series_instance_uid == uid)).first()
    return found(row, "series")


def instance_counts(session: Session, series_ids: list[int]) -> dict[int, int]:
    if not series_ids:
        return {}
    return dict(
        session.execute(
            select(Instance.series_id, func.count())
            .where(Instance.series_id.in_(series_ids))
            .group_by(Instance.series_id)
        ).all()
    )


def series_out(s: Series, study_uid: str, n: int, rule: ZoneRule) -> SeriesOut:
    return from_row(
        SeriesOut, s, study_instance_uid=study_uid, zone=rule.zone(s.series_description), instance_count=n
    )


def study_clips(session: Session, study_uid: str) -> list[Clip]:
    """Each SOP instance of the study at its latest version, with that version's latest result."""
    study_id = found(session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid)), "study")
    instances = session.execute(
        select(
            Instance.id,
            Instance.sop_instance_uid,
            Instance.version,
            Instance.state,
            Series.series_instance_uid,
            Series.series_description,
        )
        .join(Series, Instance.series_id == Series.id)
        .where(Series.study_id == study_id)
    )
    latest = list(latest_versions(instances).values())
    if not latest:
        return []
    results = latest_results(
        session.execute(
            select(
                Result.id, Result.instance_id, Result.score, Result.gradable, Result.ungradable_reason
            ).where(Result.instance_id.in_([i.id for i in latest]))
        )
    )

    def clip(i: Any) -> Clip:
        fields = (i.sop_instance_uid, i.series_instance_uid, i.series_description, i.state)
        r = results.get(i.id)
        if r is None:
            return Clip(*fields)
        score = graded_score(r.score, r.gradable)
        return Clip(*fields, result_id=r.id, score=score, gradable=r.gradable, reason=r.ungradable_reason)

    return [clip(i) for i in latest]
