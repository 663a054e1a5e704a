"""Studies and series: what was received, searchable by date, patient, accession, sender, state, score."""

from __future__ import annotations

from collections import defaultdict
from datetime import date
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from sqlalchemy import exists, func, select
from sqlalchemy.orm import Session

from service.api.deps import DbSession, api_state, read_scope, run_db
from service.api.pagination import MAX_LIMIT, SortKey, next_cursor, paginate, sort_pattern
from service.api.problems import not_found, responses
from service.api.schemas import (
    UID_PATTERN,
    Page,
    SeriesOut,
    StudyDetail,
    StudyOut,
    StudyResults,
    UnzonedInstance,
    ZoneInstance,
    ZoneScore,
)
from service.api.zones import ZoneRule
from service.core.models import Instance, InstanceState, Job, JobState, Result, Series, Study

router = APIRouter(prefix="/api/v1", tags=["studies"], dependencies=[Depends(read_scope)])

Uid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="DICOM UID")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")]
Cursor = Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page.")]

_STUDY_SORTS = {
    "study_date": SortKey(func.coalesce(Study.study_date, ""), "str"),
    "created_at": SortKey(Study.created_at, "datetime"),
}
_SERIES_SORTS = {
    "series_number": SortKey(func.coalesce(Series.series_number, -1), "int"),
    "created_at": SortKey(Series.created_at, "datetime"),
}


def _dicom_date(d: str | None) -> str | None:
    if d and len(d) == 8 and d.isdigit():
        return f"{d[:4]}-{d[4:6]}-{d[6:]}"
    return d or None


def _study_counts(session: Session, ids: list[int]) -> tuple[dict[int, int], dict[int, int]]:
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


def _study_out(s: Study, series_n: int, inst_n: int) -> StudyOut:
    return StudyOut(
        study_instance_uid=s.study_instance_uid,
        patient_id=s.patient_id,
        accession_number=s.accession_number,
        study_date=_dicom_date(s.study_date),
        study_description=s.study_description,
        series_count=series_n,
        instance_count=inst_n,
        created_at=s.created_at,
    )


@router.get("/studies", response_model=Page[StudyOut], summary="List studies", responses=responses(400))
def list_studies(
    session: DbSession,
    patient_id: Annotated[str | None, Query(max_length=64)] = None,
    accession_number: Annotated[str | None, Query(max_length=64)] = None,
    date_from: Annotated[date | None, Query(description="Study date on or after (YYYY-MM-DD).")] = None,
    date_to: Annotated[date | None, Query(description="Study date on or before (YYYY-MM-DD).")] = None,
    calling_ae: Annotated[
        str | None, Query(max_length=16, description="Has an instance from this AE.")
    ] = None,
    job_state: Annotated[JobState | None, Query(description="Has a job in this state.")] = None,
    score_min: Annotated[
        int | None, Query(ge=0, le=3, description="Has a result scoring at least this.")
    ] = None,
    score_max: Annotated[
        int | None, Query(ge=0, le=3, description="Has a result scoring at most this.")
    ] = None,
    sort: Annotated[str, Query(pattern=sort_pattern(list(_STUDY_SORTS)))] = "-created_at",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[StudyOut]:
    stmt = select(Study)
    if patient_id is not None:
        stmt = stmt.where(Study.patient_id == patient_id)
    if accession_number is not None:
        stmt = stmt.where(Study.accession_number == accession_number)
    if date_from is not None:
        stmt = stmt.where(Study.study_date >= date_from.strftime("%Y%m%d"))
    if date_to is not None:
        stmt = stmt.where(Study.study_date <= date_to.strftime("%Y%m%d"))
    inst_of_study = (
        select(Instance.id).join(Series, Instance.series_id == Series.id).where(Series.study_id == Study.id)
    )
    if calling_ae is not None:
        stmt = stmt.where(exists(inst_of_study.where(Instance.calling_ae == calling_ae)))
    if job_state is not None:
        stmt = stmt.where(
            exists(inst_of_study.join(Job, Job.instance_id == Instance.id).where(Job.state == job_state))
        )
    if score_min is not None or score_max is not None:
        q = inst_of_study.join(Result, Result.instance_id == Instance.id)
        if score_min is not None:
            q = q.where(Result.score >= score_min)
        if score_max is not None:
            q = q.where(Result.score <= score_max)
        stmt = stmt.where(exists(q))
    stmt, _, _ = paginate(stmt, sort=sort, keys=_STUDY_SORTS, id_col=Study.id, cursor=cursor, limit=limit)
    rows = list(session.scalars(stmt))
    page = rows[:limit]
    series_n, inst_n = _study_counts(session, [s.id for s in page])
    by_date = sort.lstrip("-") == "study_date"

    def value_of(s: Study) -> Any:
        return (s.study_date or "") if by_date else s.created_at

    return Page[StudyOut](
        items=[_study_out(s, series_n.get(s.id, 0), inst_n.get(s.id, 0)) for s in page],
        next_cursor=next_cursor(rows, limit, sort, value_of, lambda s: s.id),
        limit=limit,
    )


def _get_study(session: Session, uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == uid))
    if study is None:
        raise not_found("study")
    return study


def _series_out(s: Series, study_uid: str, n: int, rule: ZoneRule) -> SeriesOut:
    return SeriesOut(
        series_instance_uid=s.series_instance_uid,
        study_instance_uid=study_uid,
        modality=s.modality,
        series_number=s.series_number,
        series_description=s.series_description,
        body_part=s.body_part,
        zone=rule.zone(s.series_description),
        instance_count=n,
        created_at=s.created_at,
    )


def _instance_counts(session: Session, series_ids: list[int]) -> dict[int, int]:
    if not series_ids:
        return {}
    return dict(
        session.execute(
            select(Instance.series_id, func.count())
            .where(Instance.series_id.in_(series_ids))
            .group_by(Instance.series_id)
        ).all()
    )


@router.get(
    "/studies/{study_instance_uid}",
    response_model=StudyDetail,
    summary="Study with its series",
    responses=responses(404),
)
def get_study(request: Request, study_instance_uid: Uid, session: DbSession) -> StudyDetail:
    study = _get_study(session, study_instance_uid)
    rule: ZoneRule = request.app.state.zone_rule
    series = list(
        session.scalars(
            select(Series).where(Series.study_id == study.id).order_by(Series.series_number, Series.id)
        )
    )
    counts = _instance_counts(session, [s.id for s in series])
    base = _study_out(study, len(series), sum(counts.values()))
    return StudyDetail(
        **base.model_dump(),
        series=[_series_out(s, study.study_instance_uid, counts.get(s.id, 0), rule) for s in series],
    )


def _study_clips(session: Session, study_uid: str) -> tuple[dict[str, Any], dict[int, Any]]:
    """(sop uid -> row of its latest version, instance id -> its latest result row)."""
    study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
    if study_id is None:
        raise not_found("study")
    rows = session.execute(
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
    ).all()
    latest: dict[str, Any] = {}  # sop uid -> row of its latest version
    for row in rows:
        cur = latest.get(row.sop_instance_uid)
        if cur is None or row.version > cur.version:
            latest[row.sop_instance_uid] = row
    results: dict[int, Any] = {}  # instance id -> its latest result (id, score, gradability)
    if latest:
        ids = [row.id for row in latest.values()]
        stmt = select(
            Result.id, Result.instance_id, Result.score, Result.gradable, Result.ungradable_reason
        ).where(Result.instance_id.in_(ids))
        for res in session.execute(stmt.order_by(Result.id)):
            results[res.instance_id] = res  # ascending id: the last one wins
    return latest, results


@router.get(
    "/studies/{study_instance_uid}/results",
    response_model=StudyResults,
    summary="Zone scores and the patient total of a study",
    description=(
        "Each clip's score is the latest result of its latest version. A zone's score is the maximum over its"
        " gradable clips; the total is the sum of the zone scores. A zone whose clips are all not gradable"
        " has no score, is listed in not_gradable_zones and makes the total incomplete (complete=false)."
        " Zones come from the series description (LUSAI_ZONE_MAP, then LUSAI_ZONE_PATTERN; default"
        " 'LUS R1'..'LUS L3')."
    ),
    responses=responses(404),
)
async def study_results(request: Request, study_instance_uid: Uid) -> StudyResults:
    rule: ZoneRule = request.app.state.zone_rule
    expected = [z.upper() for z in api_state(request).settings.zones_expected]
    latest, results = await run_db(request, lambda s: _study_clips(s, study_instance_uid))
    zones: dict[str, list[ZoneInstance]] = defaultdict(list)
    unzoned: list[UnzonedInstance] = []
    pending = 0
    for uid, inst in sorted(latest.items()):
        r = results.get(inst.id)
        if r is None:
            pending += inst.state == InstanceState.ACCEPTED
            continue
        item: dict[str, Any] = {
            "sop_instance_uid": uid, "series_instance_uid": inst.series_instance_uid, "result_id": r.id,
            "score": r.score if r.gradable else None, "gradable": r.gradable, "reason": r.ungradable_reason,
        }  # fmt: skip
        zone = rule.zone(inst.series_description)
        if zone is None:
            unzoned.append(UnzonedInstance(**item, series_description=inst.series_description))
        else:
            zones[zone].append(ZoneInstance(**item))
    zone_scores = [_zone_score(z, items) for z, items in sorted(zones.items())]
    missing = [z for z in expected if z not in zones]
    not_gradable = [z.zone for z in zone_scores if z.score is None]
    return StudyResults(
        study_instance_uid=study_instance_uid,
        zones=zone_scores,
        total_score=sum(z.score or 0 for z in zone_scores),
        zones_expected=expected,
        missing_zones=missing,
        not_gradable_zones=not_gradable,
        complete=not missing and not any(z in not_gradable for z in expected),
        unzoned=unzoned,
        pending=pending,
    )


def _zone_score(zone: str, items: list[ZoneInstance]) -> ZoneScore:
    """The maximum over the zone's gradable clips; no score when none of them is gradable."""
    scores = [i.score for i in items if i.score is not None]
    return ZoneScore(zone=zone, score=max(scores) if scores else None, gradable=bool(scores), instances=items)


@router.get("/series", response_model=Page[SeriesOut], summary="List series", responses=responses(400))
def list_series(
    request: Request,
    session: DbSession,
    study_instance_uid: Annotated[str | None, Query(pattern=UID_PATTERN, max_length=64)] = None,
    modality: Annotated[str | None, Query(max_length=16)] = None,
    zone: Annotated[
        str | None, Query(max_length=16, description="Only series of this lung zone (e.g. R1).")
    ] = None,
    sort: Annotated[str, Query(pattern=sort_pattern(list(_SERIES_SORTS)))] = "-created_at",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[SeriesOut]:
    rule: ZoneRule = request.app.state.zone_rule
    stmt = select(Series, Study.study_instance_uid).join(Study, Series.study_id == Study.id)
    if study_instance_uid is not None:
        stmt = stmt.where(Study.study_instance_uid == study_instance_uid)
    if modality is not None:
        stmt = stmt.where(Series.modality == modality)
    stmt, _, _ = paginate(stmt, sort=sort, keys=_SERIES_SORTS, id_col=Series.id, cursor=cursor, limit=limit)
    rows = session.execute(stmt).all()
    page = rows[:limit]
    counts = _instance_counts(session, [r[0].id for r in page])
    items = [_series_out(s, uid, counts.get(s.id, 0), rule) for s, uid in page]
    if zone is not None:  # zones are derived, not stored: filtered on the page (documented)
        items = [i for i in items if i.zone == zone.upper()]
    attr = sort.lstrip("-")
    return Page[SeriesOut](
        items=items,
        next_cursor=next_cursor(
            rows,
            limit,
            sort,
            lambda r: getattr(r[0], attr) if getattr(r[0], attr) is not None else -1,
            lambda r: r[0].id,
        ),
        limit=limit,
    )


@router.get(
    "/series/{series_instance_uid}", response_model=SeriesOut, summary="One series", responses=responses(404)
)
def get_series(request: Request, series_instance_uid: Uid, session: DbSession) -> SeriesOut:
    row = session.execute(
        select(Series, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(Series.series_instance_uid == series_instance_uid)
    ).first()
    if row is None:
        raise not_found("series")
    s, study_uid = row
    return _series_out(
        s, study_uid, _instance_counts(session, [s.id]).get(s.id, 0), request.app.state.zone_rule
    )
