"""Reviews: readers record their own score of a result; model-reader agreement per model package.

A review never changes the result it is about. The reviewer is the caller's principal (API key or
token subject), never a name from the body, so the audit log and the review agree on who it was.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service.api.auth import Principal
from service.api.deps import DbSession, read_scope, run_db, write_scope
from service.api.pagination import MAX_LIMIT, SortKey, next_cursor, paginate, sort_pattern
from service.api.problems import not_found, responses
from service.api.queries import API, instance_by_uid, utc
from service.api.schemas import (
    TEXT_PATTERN,
    UID_PATTERN,
    AgreementOut,
    IsoDateTime,
    Page,
    ReviewIn,
    ReviewOut,
)
from service.core.logs import ctx
from service.core.models import Instance, Result, Review
from service.core.reviews import ReaderAgreement, agreement_by_package

log = logging.getLogger("lusai.api")
router = APIRouter(prefix="/api/v1", tags=["reviews"])

ResultId = Annotated[int, Path(ge=1, le=2**62, description="Result ID")]
Uid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="SOP Instance UID")]
Reviewer = Annotated[
    str | None, Query(max_length=160, pattern=TEXT_PATTERN, description="Only this reviewer (principal).")
]
Since = Annotated[IsoDateTime | None, Query(description="Reviews recorded at or after (ISO 8601).")]
_SORTS = {"created_at": SortKey(Review.created_at, "datetime"), "id": SortKey(Review.id, "int")}


def _select() -> Select[*tuple[Any, ...]]:
    return (
        select(
            Review,
            Instance.sop_instance_uid,
            Instance.version,
            Result.score,
            Result.model_name,
            Result.model_version,
            Result.weights_sha256,
        )
        .join(Result, Review.result_id == Result.id)
        .join(Instance, Review.instance_id == Instance.id)
    )


def _out(row: Any) -> ReviewOut:
    rv, uid, version, model_score, name, model_version, sha = row
    return ReviewOut(
        id=rv.id,
        result_id=rv.result_id,
        sop_instance_uid=uid,
        instance_version=version,
        reviewer=rv.reviewer,
        score=rv.score,
        gradable=rv.gradable,
        a_lines=rv.a_lines,
        b_lines=rv.b_lines,
        pleura_irregular=rv.pleura_irregular,
        consolidation=rv.consolidation,
        effusion=rv.effusion,
        comments=rv.comments,
        created_at=rv.created_at,
        model={"name": name, "version": model_version, "weights_sha256": sha},
        model_score=model_score,
    )


def _record(session: Session, result: Result, body: ReviewIn, principal: Principal) -> ReviewOut:
    review = Review(
        result_id=result.id,
        instance_id=result.instance_id,
        reviewer=principal.name,
        **body.model_dump(),
    )
    session.add(review)
    session.commit()
    log.info("review recorded", extra=ctx(result_id=result.id, review_id=review.id, gradable=review.gradable))
    return _out(session.execute(_select().where(Review.id == review.id)).one())


@router.post(
    "/results/{result_id}/reviews",
    summary="Record a reader's own score of a result (the result itself is not changed)",
    status_code=201,
    response_model=ReviewOut,
    responses=responses(404),
)
def review_result(
    response: Response,
    session: DbSession,
    result_id: ResultId,
    body: ReviewIn,
    principal: Annotated[Principal, Depends(write_scope)],
) -> ReviewOut:
    result = session.get(Result, result_id)
    if result is None:
        raise not_found("result")
    out = _record(session, result, body, principal)
    response.headers["Location"] = f"{API}/results/{result_id}/reviews"
    return out


@router.post(
    "/instances/{sop_instance_uid}/reviews",
    summary="Record a reader's score of the latest result of an instance's latest version",
    status_code=201,
    response_model=ReviewOut,
    responses=responses(404),
)
def review_instance(
    response: Response,
    session: DbSession,
    sop_instance_uid: Uid,
    body: ReviewIn,
    principal: Annotated[Principal, Depends(write_scope)],
) -> ReviewOut:
    inst = instance_by_uid(session, sop_instance_uid)
    result = session.scalar(
        select(Result).where(Result.instance_id == inst.id).order_by(Result.id.desc()).limit(1)
    )
    if result is None:
        raise not_found("result of this instance")
    out = _record(session, result, body, principal)
    response.headers["Location"] = f"{API}/results/{result.id}/reviews"
    return out


def _page(
    session: Session, stmt: Select[*tuple[Any, ...]], sort: str, cursor: str | None, limit: int
) -> Page[ReviewOut]:
    stmt, _, _ = paginate(stmt, sort=sort, keys=_SORTS, id_col=Review.id, cursor=cursor, limit=limit)
    rows = session.execute(stmt).all()
    attr = sort.lstrip("-")
    return Page[ReviewOut](
        items=[_out(r) for r in rows[:limit]],
        next_cursor=next_cursor(rows, limit, sort, lambda r: getattr(r[0], attr), lambda r: r[0].id),
        limit=limit,
    )


Sort = Annotated[str, Query(pattern=sort_pattern(list(_SORTS)))]
Cursor = Annotated[str | None, Query(max_length=512)]
Limit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]


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
    if session.get(Result, result_id) is None:
        raise not_found("result")
    return _page(session, _select().where(Review.result_id == result_id), sort, cursor, limit)


@router.get(
    "/reviews",
    response_model=Page[ReviewOut],
    summary="List reviews (every recorded one; the latest per result and reviewer is the one that counts)",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_reviews(
    session: DbSession,
    reviewer: Reviewer = None,
    model_version: Annotated[str | None, Query(max_length=64, pattern=TEXT_PATTERN)] = None,
    since: Since = None,
    sort: Sort = "-id",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[ReviewOut]:
    stmt = _select()
    if reviewer is not None:
        stmt = stmt.where(Review.reviewer == reviewer)
    if model_version is not None:
        stmt = stmt.where(Result.model_version == model_version)
    if since is not None:
        stmt = stmt.where(Review.created_at >= utc(since))
    return _page(session, stmt, sort, cursor, limit)


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
async def agreement(
    request: Request,
    reviewer: Reviewer = None,
    model_version: Annotated[str | None, Query(max_length=64, pattern=TEXT_PATTERN)] = None,
    since: Since = None,
) -> Any:
    when = utc(since) if since is not None else None
    packages = await run_db(
        request,
        lambda s: agreement_by_package(s, since=when, reviewer=reviewer, model_version=model_version),
    )
    return {"packages": [_package_out(p) for p in packages]}
