"""DICOMweb STOW-RS origin server (DICOM PS3.18 10.5): ``POST /dicom-web/studies[/{study}]``.

A PACS, a viewer or a modality gateway that speaks DICOMweb stores instances here as it would in
any STOW-RS server: a ``multipart/related; type="application/dicom"`` body, one Part 10 object
per part. Each part is streamed to a temporary file (never held in memory: objects may be 2 GB)
with the upload's size limit, then taken through the same :func:`service.core.ingest.ingest_file`
as a C-STORE and ``POST /api/v1/instances``: same validation, storage, rows and queueing.

The answer is the PS3.18 store response in ``application/dicom+json``: the ReferencedSOPSequence
lists the instances stored, the FailedSOPSequence the others with the C-STORE status the SCP would
have answered as FailureReason (0xC000 unreadable, 0x0122 SOP class not supported, 0xA900 data set
or study mismatch, 0xA700 too large or no room). Status: 200 all stored, 202 some failed, 409
none stored, 413 none stored because they were all too large, 415 not ``application/dicom``
parts, 400 no parts at all.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path as FilePath
from typing import IO, TYPE_CHECKING, Annotated, Any, cast

import pydicom
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from service.api.deps import api_state, write_scope
from service.api.problems import ProblemError, responses
from service.api.schemas import UID_PATTERN
from service.core.dicom import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATA_SET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
)
from service.core.header import RejectedObject
from service.core.ingest import ingest_file
from service.core.logs import ctx
from service.core.runtime import Runtime
from service.core.storage import NO_SPACE, StorageFull

if TYPE_CHECKING:
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger("lusai.api")

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"


class DicomJSONResponse(JSONResponse):
    """A DICOM JSON data set (PS3.18 F.2)."""

    media_type = DICOM_JSON


StudyUid = Annotated[str, Path(pattern=UID_PATTERN, max_length=64, description="Study Instance UID")]

_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_SEQUENCE = "00081199"
_REFERENCED_SOP_CLASS_UID = "00081150"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


@dataclass
class _Part:
    """One part of the body as it is spooled: its headers, its file, what went wrong."""

    headers: dict[str, str] = field(default_factory=dict)
    tmp: FilePath | None = None
    out: IO[bytes] | None = None
    size: int = 0
    failure: int | None = None  # the FailureReason, once known
    too_large: bool = False

    def discard(self) -> None:
        if self.out is not None:
            self.out.close()
            self.out = None
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None


@dataclass
class _Stored:
    """The outcome of one part: stored, or failed with ``reason``; UIDs as far as readable."""

    sop_class_uid: str | None
    sop_instance_uid: str | None
    reason: int | None = None
    too_large: bool = False


class _Spooler:
    """python-multipart callbacks that write each part into a temporary file of the store, at
    most ``limit`` bytes (the rest of a larger part is read and dropped), and queue finished
    parts for :meth:`take`."""

    def __init__(self, runtime: Runtime, limit: int) -> None:
        self.runtime = runtime
        self.limit = limit
        self.current: _Part | None = None
        self.finished: list[_Part] = []
        self.ended = False
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self._begin,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._data,
            "on_part_end": self._end,
            "on_end": self._all_done,
        }

    def _begin(self) -> None:
        self.current = _Part()

    def _header_end(self) -> None:
        assert self.current is not None
        name = self._field.decode("latin-1").strip().lower()
        self.current.headers[name] = self._value.decode("latin-1").strip()
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        part = self.current
        assert part is not None
        ctype = part.headers.get("content-type")
        if ctype is not None and ctype.split(";")[0].strip().lower() != "application/dicom":
            part.failure = STATUS_CANNOT_UNDERSTAND
            return
        part.tmp = self.runtime.store.new_temp()
        part.out = part.tmp.open("wb")

    def _data(self, data: bytes, start: int, end: int) -> None:
        part = self.current
        if part is None or part.out is None:
            return
        part.size += end - start
        if part.size > self.limit:
            part.failure, part.too_large = STATUS_OUT_OF_RESOURCES, True
            part.discard()
            return
        try:
            part.out.write(data[start:end])
        except OSError as exc:
            part.failure = STATUS_OUT_OF_RESOURCES if exc.errno in NO_SPACE else STATUS_PROCESSING_FAILURE
            part.discard()

    def _end(self) -> None:
        part = self.current
        assert part is not None
        if part.out is not None:
            part.out.close()
            part.out = None
        if part.failure is None and part.size == 0:
            part.failure = STATUS_CANNOT_UNDERSTAND
            part.discard()
        self.finished.append(part)
        self.current = None

    def _all_done(self) -> None:
        self.ended = True

    def take(self) -> list[_Part]:
        done, self.finished = self.finished, []
        return done

    def cleanup(self) -> None:
        for part in [*self.finished, *([self.current] if self.current else [])]:
            part.discard()
        self.finished, self.current = [], None


def _uids(path: FilePath) -> tuple[str | None, str | None, str | None]:
    """(SOP Class, SOP Instance, Study Instance) UIDs of a spooled part, None where unreadable."""
    try:
        ds = pydicom.dcmread(
            path,
            stop_before_pixels=True,
            force=True,
            specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID"],
        )
    except Exception:  # anything pydicom raises on bytes that are not DICOM: ingest says why
        return None, None, None
    values = (ds.get("SOPClassUID"), ds.get("SOPInstanceUID"), ds.get("StudyInstanceUID"))
    return tuple(str(v) if v else None for v in values)  # type: ignore[return-value]


def _store_part(part: _Part, study: str | None, runtime: Runtime) -> _Stored:
    """Ingest one spooled part (in a worker thread); the temporary file is consumed."""
    if part.failure is not None or part.tmp is None:
        part.discard()
        return _Stored(None, None, part.failure or STATUS_CANNOT_UNDERSTAND, part.too_large)
    tmp, part.tmp = part.tmp, None
    sop_class, sop_instance, study_uid = _uids(tmp)
    if study is not None and study_uid is not None and study_uid != study:
        tmp.unlink(missing_ok=True)  # PS3.18 10.5.3: not of the study the request names
        return _Stored(sop_class, sop_instance, STATUS_DATA_SET_MISMATCH)
    try:
        outcome = ingest_file(tmp, calling_ae=None, runtime=runtime)
    except RejectedObject as exc:
        return _Stored(sop_class, sop_instance, exc.dimse_status)
    except StorageFull:
        return _Stored(sop_class, sop_instance, STATUS_OUT_OF_RESOURCES)
    except OSError:  # the store's mount gone (EIO, ESTALE): nothing indexed, the client may resend
        return _Stored(sop_class, sop_instance, STATUS_PROCESSING_FAILURE)
    finally:
        tmp.unlink(missing_ok=True)
    return _Stored(sop_class, outcome.sop_instance_uid)


def _item(result: _Stored) -> dict[str, Any]:
    item: dict[str, Any] = {}
    if result.sop_class_uid:
        item[_REFERENCED_SOP_CLASS_UID] = {"vr": "UI", "Value": [result.sop_class_uid]}
    if result.sop_instance_uid:
        item[_REFERENCED_SOP_INSTANCE_UID] = {"vr": "UI", "Value": [result.sop_instance_uid]}
    if result.reason is not None:
        item[_FAILURE_REASON] = {"vr": "US", "Value": [result.reason]}
    return item


def store_response(results: list[_Stored]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the PS3.18 store response data set (DICOM JSON) of ``results``."""
    stored = [r for r in results if r.reason is None]
    failed = [r for r in results if r.reason is not None]
    body: dict[str, Any] = {}
    if failed:
        body[_FAILED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(r) for r in failed]}
    if stored:
        body[_REFERENCED_SOP_SEQUENCE] = {"vr": "SQ", "Value": [_item(r) for r in stored]}
    if not failed:
        return 200, body
    if stored:
        return 202, body
    return (413 if all(r.too_large for r in failed) else 409), body


def _boundary(request: Request) -> bytes:
    """The multipart boundary; 415 unless the body is multipart/related of application/dicom."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    kind = params.get(b"type", b"application/dicom").decode("latin-1").strip().lower()
    if ctype != b"multipart/related" or kind != "application/dicom":
        raise ProblemError(415, "unsupported-media-type", 'send multipart/related; type="application/dicom"')
    boundary = params.get(b"boundary", b"")
    if not boundary or len(boundary) > 200:
        raise ProblemError(400, "bad-request", "multipart/related body without a valid boundary")
    return boundary


async def _store(request: Request, study: str | None) -> DicomJSONResponse:
    runtime = api_state(request).runtime
    boundary = _boundary(request)
    spooler = _Spooler(runtime, runtime.settings.max_object_bytes)
    parser = MultipartParser(boundary, cast("MultipartCallbacks", spooler.callbacks()))
    results: list[_Stored] = []
    malformed = False
    try:
        async for chunk in request.stream():
            if not malformed:
                try:
                    parser.write(chunk)
                except MultipartParseError:
                    malformed = True  # the rest is read and dropped; what came before counts
            for part in spooler.take():
                results.append(await asyncio.to_thread(_store_part, part, study, runtime))
        if not malformed:
            parser.finalize()
        for part in spooler.take():
            results.append(await asyncio.to_thread(_store_part, part, study, runtime))
        if malformed or spooler.current is not None:  # cut short: the open part is lost
            results.append(_Stored(None, None, STATUS_CANNOT_UNDERSTAND))
    finally:
        spooler.cleanup()
    if not results:
        raise ProblemError(400, "bad-request", "the multipart body has no parts")
    status, body = store_response(results)
    stored = sum(r.reason is None for r in results)
    log.info("stow-rs", extra=ctx(parts=len(results), stored=stored, status=status))
    return DicomJSONResponse(body, status_code=status)


_STORE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            'multipart/related; type="application/dicom"': {"schema": {"type": "string", "format": "binary"}}
        },
    }
}
_STORE_RESPONSE = {"content": {DICOM_JSON: {"schema": {"type": "object"}}}}
_STORE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {**_STORE_RESPONSE, "description": "Every instance stored (ReferencedSOPSequence)"},
    202: {
        **_STORE_RESPONSE,
        "description": "Some stored, some failed (FailedSOPSequence with FailureReason)",
    },
    409: {**_STORE_RESPONSE, "description": "None stored (FailedSOPSequence with FailureReason)"},
    413: {**_STORE_RESPONSE, "description": "None stored: every instance larger than LUSAI_MAX_OBJECT_BYTES"},
    **{k: v for k, v in responses(415).items() if k != 413},
}
_DESCRIPTION = (
    "DICOMweb STOW-RS (PS3.18 10.5): a multipart/related body of application/dicom parts, each taken"
    " through the same ingest as a C-STORE. Answers the store response as application/dicom+json."
)


@router.post(
    "/studies",
    summary="STOW-RS: store instances",
    description=_DESCRIPTION,
    openapi_extra=_STORE_BODY,
    response_class=DicomJSONResponse,
    responses=_STORE_RESPONSES,
)
async def store_instances(request: Request, principal: Any = Depends(write_scope)) -> DicomJSONResponse:
    return await _store(request, None)


@router.post(
    "/studies/{study}",
    summary="STOW-RS: store instances of one study",
    description=_DESCRIPTION + " A part of another study fails with FailureReason 0xA900.",
    openapi_extra=_STORE_BODY,
    response_class=DicomJSONResponse,
    responses=_STORE_RESPONSES,
)
async def store_study_instances(
    request: Request, study: StudyUid, principal: Any = Depends(write_scope)
) -> DicomJSONResponse:
    return await _store(request, study)
