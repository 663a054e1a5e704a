"""Reviews: the lists (all, or of one result), with the reviewed result's model beside each."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, select
from sqlalchemy.orm import Session

from service.api.pagination import SortKey, Sorts
from service.api.queries import found
from service.api.queries.filters import equal, period
from service.api.schemas import ReviewFilter, ReviewOut, from_row
from service.core.models import Instance, Result, Review

SORTS = Sorts(
    {"created_at": SortKey(Review.created_at, "datetime"), "id": SortKey(Review.id, "int")}, Review.id
)


def _select() -> Select[*tuple[Any, ...]]:
    """Rows of (Review, sop_instance_uid, version, score, model_name, model_version, weights_sha256)."""
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


def select_reviews(
    f: ReviewFilter | None = None, *, result_id: int | None = None
) -> Select[*tuple[Any, ...]]:
    """Every recorded review (or those of one result) that ``f`` asks for."""
    f = f or ReviewFilter()
    stmt = _select().where(
        *equal(f, Review.reviewer, Result.model_version), *period(Review.created_at, f.since, None)
    )
    return stmt if result_id is None else stmt.where(Review.result_id == result_id)


def review_by_id(session: Session, review_id: int) -> Any:
    """The row of :func:`_select` of one review."""
    return session.execute(_select().where(Review.id == review_id)).one()


def latest_result_of(session: Session, instance_id: int) -> Result:
    """The latest result of an instance version; 404 if it has none."""
    latest = select(Result).where(Result.instance_id == instance_id).order_by(Result.id.desc()).limit(1)
    return found(session.scalar(latest), "result of this instance")


def review_out(row: Any) -> ReviewOut:
    rv = row.Review
    return from_row(
        ReviewOut,
        rv,
        sop_instance_uid=row.sop_instance_uid,
        instance_version=row.version,
        model={"name": row.model_name, "version": row.model_version, "weights_sha256": row.weights_sha256},
        model_score=row.score,
    )
