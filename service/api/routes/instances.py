"""Instances: list, detail, latest result, upload (the C-STORE ingest path over HTTP), re-run."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.api.deps import DbSession, api_state, read_scope, run_db, write_scope
from service.api.pagination import MAX_LIMIT, SortKey, next_cursor, paginate, sort_pattern
from service.api.problems import ProblemError, responses
from service.api.queries import instance_by_uid, job_out, latest_result_by_uid, result_out, utc
from service.api.schemas import (
    UID_PATTERN,
    InstanceOut,
    IsoDateTime,
    JobOut,
    JobSummary,
    Page,
    RerunRequest,
    ResultOut,
    UploadOut,
)
from service.core.logs import ctx
from service.core.models import Instance, InstanceState, Job, JobState, Result, Series, Study
from service.core.queue import enqueue_analysis
from service.core.storage import StorageFull
from service.receive.ingest import ingest_file
from service.receive.validate import RejectedObject

log = logging.getLogger("lusai.api")
router = APIRouter(prefix="/api/v1", tags=["instances"])

Uid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="SOP Instance UID")]
Version = Annotated[int | None, Query(ge=1, le=100000, description="Instance version; default the latest.")]
_SORTS = {"received_at": SortKey(Instance.received_at, "datetime"), "id": SortKey(Instance.id, "int")}
ACTIVE = (JobState.QUEUED, JobState.RUNNING, JobState.RETRYING)


def _instance_out(
    inst: Instance, series_uid: str, study_uid: str, job: Job | None, score: int | None
) -> InstanceOut:
    return InstanceOut(
        sop_instance_uid=inst.sop_instance_uid,
        version=inst.version,
        series_instance_uid=series_uid,
        study_instance_uid=study_uid,
        sop_class_uid=inst.sop_class_uid,
        transfer_syntax_uid=inst.transfer_syntax_uid,
        frames=inst.frames,
        rows=inst.rows,
        columns=inst.columns,
        calling_ae=inst.calling_ae,
        received_at=inst.received_at,
        size_bytes=inst.size_bytes,
        sha256=inst.sha256,
        state=inst.state,
        ignore_reason=inst.ignore_reason,
        latest_job=JobSummary(id=job.id, state=job.state, model_version=job.model_version) if job else None,
        score=score,
    )


def _jobs_and_scores(session: Session, ids: list[int]) -> tuple[dict[int, Job], dict[int, int | None]]:
    """Jobs and latest result scores by instance id (None: not gradable)."""
    jobs: dict[int, Job] = {}
    scores: dict[int, int | None] = {}
    if ids:
        for j in session.scalars(select(Job).where(Job.instance_id.in_(ids)).order_by(Job.id)):
            jobs[j.instance_id] = j
        for iid, score in session.execute(
            select(Result.instance_id, Result.score).where(Result.instance_id.in_(ids)).order_by(Result.id)
        ):
            scores[iid] = score
    return jobs, scores


@router.get(
    "/instances",
    response_model=Page[InstanceOut],
    summary="List received instances",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_instances(
    session: DbSession,
    study_instance_uid: Annotated[str | None, Query(pattern=UID_PATTERN, max_length=64)] = None,
    series_instance_uid: Annotated[str | None, Query(pattern=UID_PATTERN, max_length=64)] = None,
    patient_id: Annotated[str | None, Query(max_length=64)] = None,
    accession_number: Annotated[str | None, Query(max_length=64)] = None,
    calling_ae: Annotated[str | None, Query(max_length=16)] = None,
    state: InstanceState | None = None,
    received_from: Annotated[IsoDateTime | None, Query(description="Received at or after (ISO 8601)")] = None,
    received_to: Annotated[IsoDateTime | None, Query(description="Received before (ISO 8601).")] = None,
    sort: Annotated[str, Query(pattern=sort_pattern(list(_SORTS)))] = "-received_at",
    cursor: Annotated[str | None, Query(max_length=512)] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 50,
) -> Page[InstanceOut]:
    stmt = (
        select(Instance, Series.series_instance_uid, Study.study_instance_uid)
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
    )
    filters: list[Any] = []
    if study_instance_uid is not None:
        filters.append(Study.study_instance_uid == study_instance_uid)
    if series_instance_uid is not None:
        filters.append(Series.series_instance_uid == series_instance_uid)
    if patient_id is not None:
        filters.append(Study.patient_id == patient_id)
    if accession_number is not None:
        filters.append(Study.accession_number == accession_number)
    if calling_ae is not None:
        filters.append(Instance.calling_ae == calling_ae)
    if state is not None:
        filters.append(Instance.state == state)
    if received_from is not None:
        filters.append(Instance.received_at >= utc(received_from))
    if received_to is not None:
        filters.append(Instance.received_at < utc(received_to))
    stmt, _, _ = paginate(
        stmt.where(*filters), sort=sort, keys=_SORTS, id_col=Instance.id, cursor=cursor, limit=limit
    )
    rows = session.execute(stmt).all()
    page = rows[:limit]
    jobs, scores = _jobs_and_scores(session, [r[0].id for r in page])
    attr = sort.lstrip("-")
    return Page[InstanceOut](
        items=[_instance_out(i, se, st, jobs.get(i.id), scores.get(i.id)) for i, se, st in page],
        next_cursor=next_cursor(rows, limit, sort, lambda r: getattr(r[0], attr), lambda r: r[0].id),
        limit=limit,
    )


def _uids(session: Session, inst: Instance) -> tuple[str, str]:
    row = session.execute(
        select(Series.series_instance_uid, Study.study_instance_uid)
        .join(Study, Series.study_id == Study.id)
        .where(Series.id == inst.series_id)
    ).one()
    return row[0], row[1]


@router.get(
    "/instances/{sop_instance_uid}",
    response_model=InstanceOut,
    summary="One instance (latest version unless ?version=)",
    dependencies=[Depends(read_scope)],
    responses=responses(404),
)
def get_instance(session: DbSession, sop_instance_uid: Uid, version: Version = None) -> InstanceOut:
    inst = instance_by_uid(session, sop_instance_uid, version)
    jobs, scores = _jobs_and_scores(session, [inst.id])
    return _instance_out(inst, *_uids(session, inst), jobs.get(inst.id), scores.get(inst.id))


@router.get(
    "/instances/{sop_instance_uid}/result",
    response_model=ResultOut,
    summary="Latest result of an instance: video score, per-frame scores, measurements, model",
    dependencies=[Depends(read_scope)],
    responses=responses(404),
)
async def instance_result(
    request: Request,
    sop_instance_uid: Uid,
    version: Version = None,
    model_version: Annotated[str | None, Query(max_length=64)] = None,
) -> ResultOut:
    row = await run_db(request, lambda s: latest_result_by_uid(s, sop_instance_uid, version, model_version))
    return result_out(row)


@router.post(
    "/instances/{sop_instance_uid}/jobs",
    response_model=JobOut,
    status_code=202,
    summary="Analyse the instance again (optionally with another model version)",
    dependencies=[Depends(write_scope)],
    responses=responses(404, 409),
)
def rerun(
    session: DbSession,
    sop_instance_uid: Uid,
    body: Annotated[RerunRequest | None, Body()] = None,
) -> JobOut:
    body = body or RerunRequest()
    inst = instance_by_uid(session, sop_instance_uid, body.version)
    if inst.state == InstanceState.IGNORED:
        raise ProblemError(409, "not-analysable", f"the instance was not analysed: {inst.ignore_reason}")
    active = session.scalar(select(Job.id).where(Job.instance_id == inst.id, Job.state.in_(ACTIVE)).limit(1))
    if active is not None:
        raise ProblemError(409, "job-active", f"job {active} of this instance is still queued or running")
    job = Job(instance_id=inst.id, state=JobState.QUEUED, model_version=body.model_version)
    session.add(job)
    session.commit()
    try:
        enqueue_analysis(job.id)
        job.enqueued_at = datetime.now(UTC)
        session.commit()
    except Exception as exc:  # the row is the truth: the recovery sweep sends it when the broker is back
        log.warning(
            "broker unavailable, job left for recovery", extra=ctx(job_id=job.id, error=type(exc).__name__)
        )
    return job_out(job, inst.sop_instance_uid, inst.version, None)


_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/dicom": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}


async def _spool(request: Request, limit: int, tmp: Any) -> None:
    """Copy the body (raw or the multipart 'file' part) into ``tmp``, at most ``limit`` bytes."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    size = 0
    with open(tmp, "wb") as out:
        if ctype == "application/dicom":
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise ProblemError(
                        413, "content-too-large", f"objects larger than {limit} bytes are refused"
                    )
                out.write(chunk)
        elif ctype == "multipart/form-data":
            try:
                form = await request.form(max_files=1, max_fields=4)
            except Exception as exc:
                raise ProblemError(400, "bad-request", "malformed multipart body") from exc
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ProblemError(400, "bad-request", "multipart body needs a 'file' part")
            try:
                while chunk := await upload.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise ProblemError(
                            413, "content-too-large", f"objects larger than {limit} bytes are refused"
                        )
                    out.write(chunk)
            finally:
                await form.close()
        else:
            raise ProblemError(415, "unsupported-media-type", "send application/dicom or multipart/form-data")
    if size == 0:
        raise ProblemError(400, "bad-request", "empty body")


@router.post(
    "/instances",
    response_model=UploadOut,
    status_code=202,
    summary="Upload a DICOM object for analysis (same path as C-STORE)",
    description=(
        "Body: the DICOM Part 10 file as application/dicom, or multipart/form-data with a 'file' part."
        " 202: queued for analysis; 200: stored but ignored by the routing rules or a duplicate."
    ),
    openapi_extra=_UPLOAD_BODY,
    responses={
        200: {"model": UploadOut, "description": "Stored, not queued"},
        **responses(400, 413, 415, 507),
    },
)
async def upload(request: Request, response: Response, principal: Any = Depends(write_scope)) -> UploadOut:
    st = api_state(request)
    tmp = st.store.new_temp()
    try:
        await _spool(request, st.settings.max_object_bytes, tmp)
        outcome = await asyncio.to_thread(
            ingest_file, tmp, calling_ae=None, settings=st.settings, store=st.store
        )
    except RejectedObject as exc:
        raise ProblemError(exc.http_status, "rejected-object", exc.reason) from exc
    except StorageFull as exc:
        raise ProblemError(507, "storage-full", "no space left to store the object") from exc
    finally:
        tmp.unlink(missing_ok=True)
    if outcome.outcome != "queued":
        response.status_code = 200
    response.headers["Location"] = f"/api/v1/instances/{outcome.sop_instance_uid}?version={outcome.version}"
    return UploadOut(
        outcome=outcome.outcome,
        sop_instance_uid=outcome.sop_instance_uid,
        version=outcome.version,
        job_id=outcome.job_id,
        reason=outcome.reason,
    )
