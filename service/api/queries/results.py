"""Results: the polling list, one result in full (by id, or the latest of an instance)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Select, bindparam, func, select
from sqlalchemy.orm import Session

from service.api.pagination import SortKey, Sorts
from service.api.problems import not_found
from service.api.queries import found
from service.api.queries.filters import between, equal, period
from service.api.queries.instances import instance_by_uid
from service.api.schemas import ResultFilter, ResultLinks, ResultOut
from service.core.models import Instance, Result, Series, Study
from service.core.study import graded_score

API = "/api/v1"

#: Not gradable results (score null) sort below score 0.
SORTS = Sorts(
    {
        "created_at": SortKey(Result.created_at, "datetime"),
        "score": SortKey(func.coalesce(Result.score, -1), "int"),
        "id": SortKey(Result.id, "int"),
    },
    Result.id,
)

#: Columns of a result summary; list rows carry these plus the instance's UID and version.
SUMMARY_COLUMNS = (
    Result.id, Result.job_id, Result.score, Result.gradable, Result.ungradable_reason, Result.key_frame,
    Result.b_line_fraction, Result.b_line_count,
    Result.consolidation, Result.effusion, Result.model_name, Result.model_version, Result.weights_sha256,
    Result.model_package_sha256, Result.created_at, Instance.sop_instance_uid, Instance.version,
)  # fmt: skip
_DETAIL_COLUMNS = (
    Result.frame_scores, Result.measurements, Result.seg_sop_instance_uid, Result.seg_storage_key,
    Result.sr_sop_instance_uid, Result.sr_storage_key, Result.sc_sop_instance_uid, Result.sc_storage_key,
    Result.output_audit, Result.output_audit_detail,
    Series.series_instance_uid, Study.study_instance_uid,
)  # fmt: skip


def select_results(f: ResultFilter) -> Select[*tuple[Any, ...]]:
    """Rows of :data:`SUMMARY_COLUMNS`: plain columns, without per-frame scores and measurements
    (a third of the cost of ORM objects)."""
    stmt = select(*SUMMARY_COLUMNS).select_from(Result).join(Instance, Result.instance_id == Instance.id)
    if f.study_instance_uid is not None:
        stmt = stmt.join(Series, Instance.series_id == Series.id).join(Study, Series.study_id == Study.id)
    return stmt.where(
        *between(Result.score, f.score_min, f.score_max),
        *equal(f, Result.gradable, Result.model_version, Result.consolidation, Result.effusion),
        *equal(f, Instance.sop_instance_uid, Study.study_instance_uid),
        *period(Result.created_at, f.created_from, f.created_to),
    )


def get_result(session: Session, result_id: int) -> Result:
    """The result row (its storage keys); 404 if absent."""
    return found(session.get(Result, result_id), "result")


def result_summary(r: Any) -> dict[str, Any]:
    """A :class:`ResultSummary` as a dict, from a row of :data:`SUMMARY_COLUMNS`.

    Plain rows and dicts: the response model validates the whole page in one pass in pydantic-core,
    several times faster than building 50 model objects (or ORM objects) in Python.
    """
    return {
        "id": r.id,
        "job_id": r.job_id,
        "sop_instance_uid": r.sop_instance_uid,
        "instance_version": r.version,
        "score": graded_score(r.score, r.gradable),
        "gradable": r.gradable,
        "reason": r.ungradable_reason,
        "key_frame": r.key_frame,
        "b_line_fraction": r.b_line_fraction,
        "b_line_count": r.b_line_count,
        "consolidation": r.consolidation,
        "effusion": r.effusion,
        "model": {
            "name": r.model_name,
            "version": r.model_version,
            "weights_sha256": r.weights_sha256,
            "package_sha256": r.model_package_sha256,
        },
        "created_at": r.created_at,
    }


def _detail_query() -> Select[*tuple[Any, ...]]:
    return (
        select(*SUMMARY_COLUMNS, *_DETAIL_COLUMNS)
        .select_from(Result)
        .join(Instance, Result.instance_id == Instance.id)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
    )


_BY_ID = _detail_query().where(Result.id == bindparam("result_id"))
_LATEST_VERSION = (
    select(Instance.id)
    .where(Instance.sop_instance_uid == bindparam("uid"))
    .order_by(Instance.version.desc())
    .limit(1)
    .scalar_subquery()
)
#: The common case prebuilt: building a 24-column statement per request costs more than running it.
_LATEST_BY_UID = (
    _detail_query().where(Result.instance_id == _LATEST_VERSION).order_by(Result.id.desc()).limit(1)
)


def result_by_id(session: Session, result_id: int) -> Any:
    """One query for the result and the UIDs around it (the hot path of dashboards).

    Plain column rows run on the session's connection: the ORM layer would only add overhead.
    """
    return found(session.connection().execute(_BY_ID, {"result_id": result_id}).first(), "result")


def latest_result_by_uid(session: Session, uid: str, version: int | None, model_version: str | None) -> Any:
    """The latest result of (the given or latest version of) a SOP instance, in one query."""
    if version is None and model_version is None:
        row = session.connection().execute(_LATEST_BY_UID, {"uid": uid}).first()
    else:
        inst = select(Instance.id).where(Instance.sop_instance_uid == uid)
        if version is not None:
            inst = inst.where(Instance.version == version)
        stmt = _detail_query().where(
            Result.instance_id == inst.order_by(Instance.version.desc()).limit(1).scalar_subquery()
        )
        if model_version is not None:
            stmt = stmt.where(Result.model_version == model_version)
        row = session.connection().execute(stmt.order_by(Result.id.desc()).limit(1)).first()
    if row is None:
        instance_by_uid(session, uid, version)  # 404 for the instance if that is what is missing
        raise not_found("result of this instance")
    return row


def result_out(r: Any) -> ResultOut:
    """From a row of the detail query."""
    base = f"{API}/results/{r.id}"
    return ResultOut(
        **result_summary(r),
        series_instance_uid=r.series_instance_uid,
        study_instance_uid=r.study_instance_uid,
        frame_scores=[int(s) for s in r.frame_scores or []],
        measurements=r.measurements or {},
        seg_sop_instance_uid=r.seg_sop_instance_uid,
        sr_sop_instance_uid=r.sr_sop_instance_uid,
        sc_sop_instance_uid=r.sc_sop_instance_uid,
        output_audit=r.output_audit,
        output_audit_detail=r.output_audit_detail,
        links=ResultLinks(
            seg=f"{base}/seg" if r.seg_storage_key else None,
            sr=f"{base}/sr" if r.sr_storage_key else None,
            preview_png=f"{base}/preview.png",
            cine_gif=f"{base}/cine.gif",
            cine_webp=f"{base}/cine.webp",
        ),
    )
