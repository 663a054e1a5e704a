"""Results: the list integrators poll, one result in full, its SEG/SR and its previews."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import FileResponse, Response
from sqlalchemy.orm import Session

from service.api.deps import DbSession, api_state, read_scope, run_db
from service.api.pagination import Cursor, Limit, paginate
from service.api.problems import ProblemError, not_found, responses
from service.api.queries.results import (
    SORTS,
    get_result,
    result_by_id,
    result_out,
    result_summary,
    select_results,
)
from service.api.schemas import Page, ResultFilter, ResultOut, ResultSummary
from service.core.storage import MEDIA_TYPES, suffix_of

router = APIRouter(prefix="/api/v1", tags=["results"], dependencies=[Depends(read_scope)])

ResultId = Annotated[int, Path(ge=1, le=2**62, description="Result ID")]
DICOM = MEDIA_TYPES["dcm"]


@router.get(
    "/results",
    response_model=Page[ResultSummary],
    summary="List results (the polling endpoint of dashboards and exports)",
    responses=responses(400),
)
async def list_results(
    request: Request,
    filters: Annotated[ResultFilter, Query()],
    sort: Annotated[str, Query(pattern=SORTS.pattern)] = "-id",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Any:
    stmt, order = select_results(filters), SORTS.order(sort)
    # Plain columns: they run on the connection, without the ORM's per-row work.
    page = await run_db(request, lambda s: paginate(s.connection(), stmt, cursor, limit, order))
    return {"items": [result_summary(r) for r in page.rows], "next_cursor": page.next_cursor, "limit": limit}


@router.get(
    "/results/{result_id}", response_model=ResultOut, summary="One result in full", responses=responses(404)
)
async def get_result_detail(request: Request, result_id: ResultId) -> ResultOut:
    return result_out(await run_db(request, lambda s: result_by_id(s, result_id)))


def _dicom_file(request: Request, key: str | None, what: str, uid: str | None) -> FileResponse:
    if not key:
        raise not_found(f"{what} of this result")
    path = api_state(request).runtime.store.path(key)
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


PreviewKind = Literal["png", "gif", "webp"]


def _preview(request: Request, session: Session, result_id: int, kind: PreviewKind) -> Response:
    """Serve the preview the worker rendered next to the SEG; nothing is rendered here."""
    r = get_result(session, result_id)
    key = {"png": r.preview_png_key, "gif": r.preview_gif_key, "webp": r.preview_webp_key}[kind]
    if key is None:
        if r.preview_error:
            raise ProblemError(
                409, "preview-unavailable", f"the worker could not render the preview: {r.preview_error}"
            )
        raise ProblemError(
            404,
            "preview-not-rendered",
            "no preview stored for this result yet: the worker renders them just after it saves a "
            "result; for a result analysed before previews were stored, re-run the job",
        )
    path = api_state(request).runtime.store.path(key)
    etag = f'"{path.stem}"'  # the SHA-256 of the image: it never changes under this key
    headers = {"ETag": etag, "Cache-Control": "private, max-age=86400"}
    if not path.is_file():
        raise ProblemError(410, "gone", "the stored preview is missing from storage")
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=MEDIA_TYPES[suffix_of(key)], headers=headers)


def _image_responses(media: str) -> dict[int | str, dict[str, Any]]:
    return {
        200: {"content": {media: {"schema": {"type": "string", "format": "binary"}}}, "description": "Image"},
        304: {"description": "Not modified (If-None-Match)"},
        **responses(404, 409, 410),
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
