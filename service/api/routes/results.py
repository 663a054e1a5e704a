"""Results: the list integrators poll, one result in full, its SEG/SR and its previews."""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.api import previews
from service.api.deps import DbSession, api_state, read_scope, run_db
from service.api.pagination import MAX_LIMIT, SortKey, next_cursor, paginate, sort_pattern
from service.api.problems import ProblemError, not_found, responses
from service.api.queries import SUMMARY_COLUMNS, result_by_id, result_out, result_summary, utc
from service.api.schemas import UID_PATTERN, IsoDateTime, Page, ResultOut, ResultSummary
from service.core.models import Instance, Result, Series, Study

router = APIRouter(prefix="/api/v1", tags=["results"], dependencies=[Depends(read_scope)])

ResultId = Annotated[int, Path(ge=1, le=2**62, description="Result ID")]
#: Not gradable results (score null) sort below score 0.
_SORTS = {
    "created_at": SortKey(Result.created_at, "datetime"),
    "score": SortKey(func.coalesce(Result.score, -1), "int"),
    "id": SortKey(Result.id, "int"),
}
DICOM = "application/dicom"
_render_locks: dict[str, threading.Lock] = {}
_render_guard = threading.Lock()


@router.get(
    "/results",
    response_model=Page[ResultSummary],
    summary="List results (the polling endpoint of dashboards and exports)",
    responses=responses(400),
)
async def list_results(
    request: Request,
    score_min: Annotated[
        int | None, Query(ge=0, le=3, description="Score at least this (not gradable results never match).")
    ] = None,
    score_max: Annotated[
        int | None, Query(ge=0, le=3, description="Score at most this (not gradable results never match).")
    ] = None,
    gradable: Annotated[
        bool | None, Query(description="false: only results whose cine could not be graded.")
    ] = None,
    model_version: Annotated[str | None, Query(max_length=64)] = None,
    created_from: Annotated[IsoDateTime | None, Query(description="Created at or after (ISO 8601).")] = None,
    created_to: Annotated[IsoDateTime | None, Query(description="Created before (ISO 8601).")] = None,
    study_instance_uid: Annotated[str | None, Query(pattern=UID_PATTERN, max_length=64)] = None,
    sop_instance_uid: Annotated[str | None, Query(pattern=UID_PATTERN, max_length=64)] = None,
    consolidation: bool | None = None,
    effusion: bool | None = None,
    sort: Annotated[str, Query(pattern=sort_pattern(list(_SORTS)))] = "-id",
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> Any:
    # Plain columns, without per-frame scores and measurements: a third of the cost of ORM objects.
    stmt = select(*SUMMARY_COLUMNS).select_from(Result).join(Instance, Result.instance_id == Instance.id)
    if score_min is not None:
        stmt = stmt.where(Result.score >= score_min)
    if score_max is not None:
        stmt = stmt.where(Result.score <= score_max)
    if gradable is not None:
        stmt = stmt.where(Result.gradable == gradable)
    if model_version is not None:
        stmt = stmt.where(Result.model_version == model_version)
    if created_from is not None:
        stmt = stmt.where(Result.created_at >= utc(created_from))
    if created_to is not None:
        stmt = stmt.where(Result.created_at < utc(created_to))
    if consolidation is not None:
        stmt = stmt.where(Result.consolidation == consolidation)
    if effusion is not None:
        stmt = stmt.where(Result.effusion == effusion)
    if sop_instance_uid is not None:
        stmt = stmt.where(Instance.sop_instance_uid == sop_instance_uid)
    if study_instance_uid is not None:
        stmt = (
            stmt.join(Series, Instance.series_id == Series.id)
            .join(Study, Series.study_id == Study.id)
            .where(Study.study_instance_uid == study_instance_uid)
        )
    stmt, _, _ = paginate(stmt, sort=sort, keys=_SORTS, id_col=Result.id, cursor=cursor, limit=limit)
    rows = await run_db(request, lambda s: s.connection().execute(stmt).all())
    attr = sort.lstrip("-")

    def value_of(row: Any) -> Any:
        value = getattr(row, attr)
        return -1 if value is None else value  # the coalesce of the score sort

    return {
        "items": [result_summary(r) for r in rows[:limit]],
        "next_cursor": next_cursor(rows, limit, sort, value_of, lambda row: row.id),
        "limit": limit,
    }


def get_result(session: Session, result_id: int) -> Result:
    r = session.get(Result, result_id)
    if r is None:
        raise not_found("result")
    return r


@router.get(
    "/results/{result_id}", response_model=ResultOut, summary="One result in full", responses=responses(404)
)
async def get_result_detail(request: Request, result_id: ResultId) -> ResultOut:
    return result_out(await run_db(request, lambda s: result_by_id(s, result_id)))


def _dicom_file(request: Request, key: str | None, what: str, uid: str | None) -> FileResponse:
    if not key:
        raise not_found(f"{what} of this result")
    path = api_state(request).store.path(key)
    if not path.is_file():
        raise ProblemError(410, "gone", f"the stored {what} object is missing from storage")
    return FileResponse(
        path,
        media_type=DICOM,
        filename=f"{uid or what}.dcm",
        headers={"Cache-Control": "private, max-age=3600"},
    )


_DICOM_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {DICOM: {"schema": {"type": "string", "format": "binary"}}},
        "description": "DICOM Part 10 file",
    },
    **responses(404, 410),
}


@router.get(
    "/results/{result_id}/seg",
    response_class=FileResponse,
    summary="DICOM Segmentation of the result",
    responses=_DICOM_RESPONSES,
)
def download_seg(request: Request, result_id: ResultId, session: DbSession) -> FileResponse:
    r = get_result(session, result_id)
    return _dicom_file(request, r.seg_storage_key, "SEG", r.seg_sop_instance_uid)


@router.get(
    "/results/{result_id}/sr",
    response_class=FileResponse,
    summary="DICOM Structured Report of the result",
    responses=_DICOM_RESPONSES,
)
def download_sr(request: Request, result_id: ResultId, session: DbSession) -> FileResponse:
    r = get_result(session, result_id)
    return _dicom_file(request, r.sr_storage_key, "SR", r.sr_sop_instance_uid)


_MEDIA = {"png": "image/png", "gif": "image/gif", "webp": "image/webp"}


def _preview(request: Request, session: Session, result_id: int, kind: previews.Kind) -> Response:
    st = api_state(request)
    s = st.settings
    path = previews.cache_path(s.data_dir, result_id, kind, s.preview_max_frames, s.preview_max_width)
    etag = f'"{path.stem}"'
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
    r = get_result(session, result_id)  # also the access check: 404 for unknown results even if cached
    if request.headers.get("if-none-match") == etag and path.is_file():
        return Response(status_code=304, headers=headers)
    if not path.is_file():
        with _render_guard:
            lock = _render_locks.setdefault(path.name, threading.Lock())
        try:
            with lock:  # one render per preview, concurrent requests wait for it
                if not path.is_file():
                    data = _render(st, session, r, kind)
                    previews.write_atomic(path, data)
                    return Response(data, media_type=_MEDIA[kind], headers=headers)
        finally:
            with _render_guard:
                _render_locks.pop(path.name, None)
    return FileResponse(path, media_type=_MEDIA[kind], headers=headers)


def _render(st: Any, session: Session, r: Result, kind: previews.Kind) -> bytes:
    inst = session.get(Instance, r.instance_id)
    assert inst is not None
    try:
        src = st.store.path(inst.storage_key)
        frames = previews.decode_source(src)
        labels = has = None
        if r.seg_storage_key:
            labels, has = previews.class_maps_from_seg(st.store.path(r.seg_storage_key), frames.shape)
    except (previews.PreviewUnavailable, ValueError, OSError) as exc:
        raise ProblemError(
            409, "preview-unavailable", str(exc) or "the stored objects cannot be rendered"
        ) from exc
    caption = previews.Caption(
        score=r.score if r.gradable else None,
        model=f"{r.model_name} {r.model_version}",
        has_overlay=labels is not None,
        reason=r.ungradable_reason,
    )
    return previews.render(
        kind,
        frames,
        labels,
        has,
        r.key_frame,
        caption,
        max_frames=st.settings.preview_max_frames,
        max_width=st.settings.preview_max_width,
        frame_ms=previews.frame_time_ms(src),
    )


def _image_responses(media: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"content": {media: {"schema": {"type": "string", "format": "binary"}}}, "description": "Image"},
        304: {"description": "Not modified (If-None-Match)"},
        **responses(404, 409),
    }


@router.get(
    "/results/{result_id}/preview.png",
    response_class=Response,
    summary="Key frame with the segmentation overlay and a legend",
    responses=_image_responses("image/png"),
)
def preview_png(request: Request, result_id: ResultId, session: DbSession) -> Response:
    return _preview(request, session, result_id, "png")


@router.get(
    "/results/{result_id}/cine.gif",
    response_class=Response,
    summary="Animated cine with the overlay and a legend (GIF)",
    responses=_image_responses("image/gif"),
)
def cine_gif(request: Request, result_id: ResultId, session: DbSession) -> Response:
    return _preview(request, session, result_id, "gif")


@router.get(
    "/results/{result_id}/cine.webp",
    response_class=Response,
    summary="Animated cine with the overlay and a legend (WebP)",
    responses=_image_responses("image/webp"),
)
def cine_webp(request: Request, result_id: ResultId, session: DbSession) -> Response:
    return _preview(request, session, result_id, "webp")
