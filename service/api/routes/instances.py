"""Instances: list, detail, latest result, upload (the C-STORE ingest path over HTTP), re-run."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Query, Request, Response

from service.api.deps import AppRuntime, DbSession, api_state, read_scope, run_db, write_scope
from service.api.pagination import Cursor, Limit, paginate
from service.api.problems import ProblemError, responses
from service.api.queries.instances import (
    SORTS,
    instance_by_uid,
    instances_out,
    parent_uids,
    select_instances,
)
from service.api.queries.jobs import job_out
from service.api.queries.results import latest_result_by_uid, result_out
from service.api.schemas import (
    UID_PATTERN,
    InstanceFilter,
    InstanceOut,
    JobOut,
    Page,
    RerunRequest,
    ResultOut,
    UploadOut,
)
from service.core import lifecycle
from service.core.header import RejectedObject
from service.core.ingest import ingest_file
from service.core.models import InstanceState
from service.core.storage import StorageFull, storage_full

router = APIRouter(prefix="/api/v1", tags=["instances"])

Uid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="SOP Instance UID")]
Version = Annotated[int | None, Query(ge=1, le=100000, description="Instance version; default the latest.")]


@router.get(
    "/instances",
    response_model=Page[InstanceOut],
    summary="List received instances",
    dependencies=[Depends(read_scope)],
    responses=responses(400),
)
def list_instances(
    session: DbSession,
    filters: Annotated[InstanceFilter, Query()],
    sort: Annotated[str, Query(pattern=SORTS.pattern)] = "-received_at",
    cursor: Cursor = None,
    limit: Limit = 50,
) -> Page[InstanceOut]:
    page = paginate(session, select_instances(filters), cursor, limit, SORTS.order(sort))
    rows = [(r.Instance, r.series_instance_uid, r.study_instance_uid) for r in page.rows]
    return Page[InstanceOut](items=instances_out(session, rows), next_cursor=page.next_cursor, limit=limit)


@router.get(
    "/instances/{sop_instance_uid}",
    response_model=InstanceOut,
    summary="One instance (latest version unless ?version=)",
    dependencies=[Depends(read_scope)],
    responses=responses(404),
)
def get_instance(session: DbSession, sop_instance_uid: Uid, version: Version = None) -> InstanceOut:
    inst = instance_by_uid(session, sop_instance_uid, version)
    return instances_out(session, [(inst, *parent_uids(session, inst))])[0]


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
    runtime: AppRuntime,
    sop_instance_uid: Uid,
    body: Annotated[RerunRequest | None, Body()] = None,
) -> JobOut:
    body = body or RerunRequest()
    inst = instance_by_uid(session, sop_instance_uid, body.version)
    if inst.state == InstanceState.IGNORED:
        raise ProblemError(409, "not-analysable", f"the instance was not analysed: {inst.ignore_reason}")
    job = lifecycle.rerun(session, inst.id, model_version=body.model_version)
    if job is None:
        active = lifecycle.active_job(session, inst.id)
        raise ProblemError(409, "job-active", f"job {active} of this instance is still queued or running")
    session.commit()
    # A broker outage leaves the job unsent: the recovery sweep sends it.
    lifecycle.enqueue(session, job.id, runtime.queue.enqueue_analysis)
    session.commit()
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
        **responses(400, 413, 415, 503, 507),
    },
)
async def upload(request: Request, response: Response, principal: Any = Depends(write_scope)) -> UploadOut:
    runtime = api_state(request).runtime
    try:
        tmp = runtime.store.new_temp()
    except OSError as exc:
        raise _storage_problem(exc) from exc
    try:
        await _spool(request, runtime.settings.max_object_bytes, tmp)
        outcome = await asyncio.to_thread(ingest_file, tmp, calling_ae=None, runtime=runtime)
    except RejectedObject as exc:
        raise ProblemError(exc.http_status, "rejected-object", exc.reason) from exc
    except OSError as exc:  # StorageFull, or the store's mount gone (EIO, ESTALE): nothing indexed
        raise _storage_problem(exc) from exc
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


def _storage_problem(exc: OSError) -> ProblemError:
    """507 for a full store (the client should not retry soon), 503 for one that cannot be
    written now (a shared mount gone: EIO, ESTALE), never a bare 500: nothing was indexed."""
    if isinstance(exc, StorageFull) or storage_full(exc):
        return ProblemError(507, "storage-full", "no space left to store the object")
    return ProblemError(
        503, "storage-unavailable", "the object store cannot be written now; send again later"
    )
