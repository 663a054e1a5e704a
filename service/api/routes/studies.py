"""Studies and series: what was received, searchable by date, patient, accession, sender, state, score."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request

from service.api.deps import DbSession, read_scope, run_db
from service.api.pagination import MAX_LIMIT, paginate
from service.api.problems import responses
from service.api.queries.studies import (
    SERIES_SORTS,
    STUDY_SORTS,
    instance_counts,
    select_series,
    select_studies,
    series_by_uid,
    series_of_study,
    series_out,
    study_by_uid,
    study_clips,
    study_counts,
    study_out,
)
from service.api.schemas import (
    UID_PATTERN,
    Page,
    SeriesFilter,
    SeriesOut,
    StudyDetail,
    StudyFilter,
    StudyOut,
    StudyResults,
    from_row,
)
from service.core.study import ZoneRule, study_total

router = APIRouter(prefix="/api/v1", tags=["studies"], dependencies=[Depends(read_scope)])

Uid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="DICOM UID")]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Page size.")]
Cursor = Annotated[str | None, Query(max_length=512, description="next_cursor of the previous page.")]


@router.get("/studies", response_model=Page[StudyOut], summary="List studies", responses=responses(400))
def list_studies(
    session: DbSession,
    filters: Annotated[StudyFilter, Query()],
    sort: Annotated[str, Query(pattern=STUDY_SORTS.pattern)] = "-created_at",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[StudyOut]:
    page = paginate(session, select_studies(filters), cursor, limit, STUDY_SORTS.order(sort))
    series_n, inst_n = study_counts(session, [r.Study.id for r in page.rows])
    return Page[StudyOut](
        items=[study_out(r.Study, series_n.get(r.Study.id, 0), inst_n.get(r.Study.id, 0)) for r in page.rows],
        next_cursor=page.next_cursor,
        limit=limit,
    )


@router.get(
    "/studies/{study_instance_uid}",
    response_model=StudyDetail,
    summary="Study with its series",
    responses=responses(404),
)
def get_study(request: Request, study_instance_uid: Uid, session: DbSession) -> StudyDetail:
    study = study_by_uid(session, study_instance_uid)
    rule: ZoneRule = request.app.state.zone_rule
    series = series_of_study(session, study.id)
    counts = instance_counts(session, [s.id for s in series])
    base = study_out(study, len(series), sum(counts.values()))
    return StudyDetail(
        **base.model_dump(),
        series=[series_out(s, study.study_instance_uid, counts.get(s.id, 0), rule) for s in series],
    )


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
    clips = await run_db(request, lambda s: study_clips(s, study_instance_uid))
    return from_row(StudyResults, study_total(clips, rule), study_instance_uid=study_instance_uid)


@router.get("/series", response_model=Page[SeriesOut], summary="List series", responses=responses(400))
def list_series(
    request: Request,
    session: DbSession,
    filters: Annotated[SeriesFilter, Query()],
    sort: Annotated[str, Query(pattern=SERIES_SORTS.pattern)] = "-created_at",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[SeriesOut]:
    rule: ZoneRule = request.app.state.zone_rule
    page = paginate(session, select_series(filters), cursor, limit, SERIES_SORTS.order(sort))
    counts = instance_counts(session, [r.Series.id for r in page.rows])
    items = [series_out(r.Series, r.study_instance_uid, counts.get(r.Series.id, 0), rule) for r in page.rows]
    if filters.zone is not None:  # zones are derived, not stored: filtered on the page (documented)
        items = [i for i in items if i.zone == filters.zone.upper()]
    return Page[SeriesOut](items=items, next_cursor=page.next_cursor, limit=limit)


@router.get(
    "/series/{series_instance_uid}", response_model=SeriesOut, summary="One series", responses=responses(404)
)
def get_series(request: Request, series_instance_uid: Uid, session: DbSession) -> SeriesOut:
    row = series_by_uid(session, series_instance_uid)
    count = instance_counts(session, [row.Series.id]).get(row.Series.id, 0)
    return series_out(row.Series, row.study_instance_uid, count, request.app.state.zone_rule)
