"""Reviews: readers record their own score of a result; model-reader agreement per model package.

A review never changes the result it is about. The reviewer is the caller's principal (API key or
token subject), never a name from the body, so the audit log and the review agree on who it was.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy.orm import Session

from service.api.auth import Principal
from service.api.deps import DbSession, read_scope, run_db, write_scope
from service.api.pagination import Cursor, Limit, paginate
from service.api.problems import responses
from service.api.queries.filters import utc
from service.api.queries.instances import instance_by_uid
from service.api.queries.results import API, get_result
from service.api.queries.reviews import SORTS, latest_result_of, review_by_id, review_out, select_reviews
from service.api.schemas import UID_PATTERN, AgreementOut, Page, ReviewFilter, ReviewIn, ReviewOut
from service.core.logs import ctx
from service.core.models import Result, Review
from service.core.reviews import ReaderAgreement, agreement_by_package

log = logging.getLogger("lusai.api")
router = APIRouter(prefix="/api/v1", tags=["reviews"])

ResultId = Annotated[int, Path(ge=1, le=2**62, description="Result ID")]
Uid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="SOP Instance UID")]
Filters = Annotated[ReviewFilter, Query()]
Sort = Annotated[str, Query(pattern=SORTS.pattern)]
Writer = Annotated[Principal, Depends(write_scope)]
#: Both ways of recording a review answer alike.
_RECORDED: dict[str, Any] = {"status_code": 201, "response_model": ReviewOut, "responses": responses(404)}


def _record(
    response: Response, session: Session, result: Result, body: ReviewIn, who: Principal
) -> ReviewOut:
    review = Review(
        result_id=result.id, instance_id=result.instance_id, reviewer=who.name, **body.model_dump()
    )
    session.add(review)
    session.commit()
    log.info("review recorded", extra=ctx(result_id=result.id, review_id=review.id, gradable=review.gradable))
    response.headers["Location"] = f"{API}/results/{result.id}/reviews"
    return review_out(review_by_id(session, review.id))


@router.post(
    "/results/{result_id}/reviews",
    summary="Record a reader's own score of a result (the result itself is not changed)",
    **_RECORDED,
)
def review_result(
    response: Response, session: DbSession, result_id: ResultId, body: ReviewIn, principal: Writer
) -> ReviewOut:
    return _record(response, session, get_result(session, result_id), body, principal)


@router.post(
    "/instances/{sop_instance_uid}/reviews",
    summary="Record a reader's score of the latest result of an instance's latest version",
    **_RECORDED,
)
def review_instance(
    response: Response, session: DbSession, sop_instance_uid: Uid, body: ReviewIn, principal: Writer
) -> ReviewOut:
    result = latest_result_of(session, instance_by_uid(session, sop_instance_uid).id)
    return _record(response, session, result, body, principal)


@router.get(
    "/results/{result_id}/reviews",
    response_model=Page[ReviewOut],
    summary="Reviews of one result, every one recorded (newest first)",
    dependencies=[Depends(read_scope)],
    responses=responses(400, 404),
)
def result_reviews(
    session: DbSession,
    result_id: ResultId,
    sort: Sort = "-id",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[ReviewOut]:
    get_result(session, result_id)  # 404 for an unknown result, not an empty page
    page = paginate(session, select_reviews(result_id=result_id), cursor, limit, SORTS.order(sort))
    return Page[ReviewOut](
        items=[review_out(r) for r in page.rows], next_cursor=page.next_cursor, limit=limit
    )


@router.get(
    "/reviews",
    response_model=Page[ReviewOut],
    summary="List reviews (every recorded one; the latest per result and reviewer is the one that counts)",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_reviews(
    session: DbSession,
    filters: Filters,
    sort: Sort = "-id",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[ReviewOut]:
    page = paginate(session, select_reviews(filters), cursor, limit, SORTS.order(sort))
    return Page[ReviewOut](
        items=[review_out(r) for r in page.rows], next_cursor=page.next_cursor, limit=limit
    )


def _stats(a: Any) -> dict[str, Any] | None:
    return None if a is None else dict(a.__dict__)


def _package_out(p: Any) -> dict[str, Any]:
    ag: ReaderAgreement = p.agreement
    k = p.package
    return {
        "model": {"name": k.model_name, "version": k.model_version, "weights_sha256": k.weights_sha256},
        "package_sha256": k.package_sha256,
        "reviewed_results": p.reviewed_results,
        "reviewers": p.reviewers,
        "reviews": ag.reviews,
        "not_gradable_by_model": ag.not_gradable_by_model,
        "not_gradable_by_reviewer": ag.not_gradable_by_reviewer,
        "graded": _stats(ag.graded),
        "ungradable_as_zero": _stats(ag.ungradable_as_zero),
    }


@router.get(
    "/agreement",
    response_model=AgreementOut,
    summary="Model-reader agreement per model package (quadratic kappa, exact, within one, confusion)",
    description=(
        "Over the latest review of each (result, reviewer). `graded` leaves out pairs where the model"
        " or the reviewer did not grade the clip (counted in `not_gradable_by_*`);"
        " `ungradable_as_zero` counts them as score 0."
    ),
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
async def agreement(request: Request, filters: Filters) -> Any:
    f = filters
    when = utc(f.since) if f.since is not None else None
    packages = await run_db(
        request,
        lambda s: agreement_by_package(s, since=when, reviewer=f.reviewer, model_version=f.model_version),
    )
    return {"packages": [_package_out(p) for p in packages]}
