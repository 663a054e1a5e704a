"""STOW-RS (DICOM PS3.18 10.5) of one stored object to a DICOMweb destination.

The stored Part 10 file is POSTed as it is, streamed from disk (never read whole into memory), as
the one part of a ``multipart/related; type="application/dicom"`` body to
``{root}/studies/{StudyInstanceUID}``. The answer is mapped onto the outcomes of a C-STORE, so the
outbox's retry, dead-letter and ordering rules hold unchanged for both transports:

* 200: stored (unless the store response lists the object as failed).
* 202: some instances failed: the object is stored when the response's ReferencedSOPSequence
  names it; when its FailedSOPSequence does, its FailureReason decides, as a C-STORE status
  would (:func:`service.core.dicom.permanent_failure`); otherwise it is retried.
* 409: nothing stored: permanent, unless the object's FailureReason is a transient one (e.g.
  0xA700 out of resources).
* 408, 429 and 5xx, connection, TLS and timeout errors: retried; a Retry-After the server sends
  (408, 429, 503) makes the next try wait at least that long (:class:`RetryLater`).
* 401 and 403 (credentials refused: a configuration error), redirects, other 4xx: permanent.

Messages name the destination's service root and status codes only: no study, patient or
credential ever reaches the outbox row or the logs.
"""

from __future__ import annotations

import json
import secrets
import ssl
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pydicom

from service.core.dicom import permanent_failure
from service.core.settings import Destination, Settings
from workers.deliver.dimse import ECHO_CONNECT_TIMEOUT, DeliveryError

#: Bytes read from the file per write to the socket.
CHUNK = 1 << 20
#: Most bytes of a store response read (it lists one instance: a few hundred bytes).
MAX_ANSWER_BYTES = 1 << 20
#: A Retry-After longer than this is taken as this (the longest backoff step).
MAX_RETRY_AFTER_S = 3600.0

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"


class RetryLater(DeliveryError):
    """A transient refusal that said when to come back (Retry-After, in seconds from now)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def _exchange(
    settings: Settings,
    request: httpx.Request,
    timeout: httpx.Timeout,
    *,
    read: int = MAX_ANSWER_BYTES,
) -> tuple[int, httpx.Headers, bytes]:
    """Send ``request`` and return (status, headers, the first ``read`` bytes of the body).

    Straight through an :class:`httpx.HTTPTransport`, not an ``httpx.Client``: the client logs
    every request's URL at INFO, and a STOW-RS URL carries the Study Instance UID. TLS is
    verified against LUSAI_DICOMWEB_CA (default the system's CA store, not certifi's); redirects
    are not followed (they would carry the credentials along); no proxy is used.
    """
    verify: ssl.SSLContext | bool = True
    if request.url.scheme == "https":
        ca = settings.dicomweb_ca
        verify = ssl.create_default_context(cafile=str(ca) if ca is not None else None)
    request.extensions["timeout"] = timeout.as_dict()
    with httpx.HTTPTransport(verify=verify) as transport:
        response = transport.handle_request(request)
        try:
            body = b""
            if read:
                for chunk in response.iter_bytes():
                    body += chunk
                    if len(body) >= read:
                        break
        finally:
            response.close()
    return response.status_code, response.headers, body[:read]


def _headers(settings: Settings, destination: Destination, **more: str) -> dict[str, str]:
    headers = {"Accept": "application/dicom+json", "User-Agent": "lusai", **more}
    authorization = settings.dicomweb_authorization(destination)
    if authorization is not None:
        headers["Authorization"] = authorization
    return headers


def _body(path: Path, boundary: str) -> tuple[Iterator[bytes], int]:
    """The multipart/related body, streamed from ``path``, and its length."""
    head = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode("ascii")
    tail = f"\r\n--{boundary}--\r\n".encode("ascii")
    size = path.stat().st_size

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                yield chunk
        yield tail

    return chunks(), len(head) + size + len(tail)


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delay-seconds or an HTTP date), at most
    :data:`MAX_RETRY_AFTER_S`; None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        seconds = float(value)
    else:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def store_answer(body: bytes) -> tuple[set[str], dict[str, int | None]]:
    """The instances a store response (application/dicom+json) lists as stored, and those it
    lists as failed with their FailureReason (None when it gives none). Empty when unreadable."""
    try:
        doc = json.loads(body)
    except ValueError:
        return set(), {}
    if isinstance(doc, list) and len(doc) == 1:  # some servers wrap the data set in an array
        doc = doc[0]
    if not isinstance(doc, dict):
        return set(), {}

    def items(tag: str) -> list[dict[str, Any]]:
        seq = doc.get(tag)
        values = seq.get("Value") if isinstance(seq, dict) else None
        return [i for i in values if isinstance(i, dict)] if isinstance(values, list) else []

    def first(item: dict[str, Any], tag: str) -> Any:
        element = item.get(tag)
        values = element.get("Value") if isinstance(element, dict) else None
        return values[0] if isinstance(values, list) and values else None

    stored = {str(first(i, _REFERENCED_SOP_INSTANCE_UID)) for i in items(_REFERENCED_SOP_SEQUENCE)}
    failed: dict[str, int | None] = {}
    for item in items(_FAILED_SOP_SEQUENCE):
        reason = first(item, _FAILURE_REASON)
        failed[str(first(item, _REFERENCED_SOP_INSTANCE_UID))] = (
            int(reason) if isinstance(reason, int) else None
        )
    return stored, failed


def _refused(root: str, reason: int | None, *, status: int) -> DeliveryError:
    if reason is None:
        return DeliveryError(f"STOW-RS to {root}: HTTP {status}, object failed without a FailureReason")
    return DeliveryError(
        f"STOW-RS to {root}: HTTP {status}, object refused with FailureReason 0x{reason:04X}",
        permanent=permanent_failure(reason),
    )


def outcome(status: int, headers: httpx.Headers, body: bytes, sop_instance_uid: str, root: str) -> None:
    """Map the answer to a STOW-RS of one object: return when it was stored, else raise
    :class:`DeliveryError` (``permanent`` when sending it again cannot help)."""
    if 200 <= status < 300:
        stored, failed = store_answer(body) if status in (200, 202) else (set(), {})
        if sop_instance_uid in failed and sop_instance_uid not in stored:
            raise _refused(root, failed[sop_instance_uid], status=status)
        if status != 202 or sop_instance_uid in stored:
            return
        raise DeliveryError(f"STOW-RS to {root}: HTTP 202 without the object among those stored")
    if status in (408, 429) or status >= 500:
        wait = retry_after(headers.get("retry-after"))
        message = f"STOW-RS to {root}: HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip()
        if wait is not None:
            raise RetryLater(f"{message} (Retry-After {wait:.0f} s)", wait)
        raise DeliveryError(message)
    if status == 409:
        _stored, failed = store_answer(body)
        reason = failed.get(sop_instance_uid)
        if reason is not None:
            raise _refused(root, reason, status=status)
        raise DeliveryError(f"STOW-RS to {root}: HTTP 409, nothing stored", permanent=True)
    if status in (401, 403):
        raise DeliveryError(
            f"STOW-RS to {root}: HTTP {status}: credentials refused; check LUSAI_DICOMWEB_AUTH for this URL",
            permanent=True,
        )
    if 300 <= status < 400:
        raise DeliveryError(
            f"STOW-RS to {root}: HTTP {status} redirect; set the destination to the URL it points to",
            permanent=True,
        )
    raise DeliveryError(
        f"STOW-RS to {root}: HTTP {status} {httpx.codes.get_reason_phrase(status)}".rstrip(), permanent=True
    )


def _transport_error(root: str, exc: httpx.HTTPError, *hidden: str) -> DeliveryError:
    """A retryable error naming what went wrong; the request URL and the UIDs (``hidden``) are
    cut out wherever the library's message quoted them."""
    text = str(exc)
    for secret in hidden:
        text = text.replace(secret, "…")
    return DeliveryError(f"STOW-RS to {root}: {type(exc).__name__}: {text}"[:500])


def stow_rs(path: Path, destination: Destination, settings: Settings) -> None:
    """POST the Part 10 file at ``path`` to ``destination``; raises :class:`DeliveryError`
    unless the server stored it."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"])
    study_uid, sop_uid = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
    root = destination.url
    url = f"{root}/studies/{quote(study_uid, safe='')}"
    boundary = secrets.token_hex(16)
    content, length = _body(path, boundary)
    headers = _headers(
        settings,
        destination,
        **{
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
        },
    )
    request = httpx.Request("POST", url, headers=headers, content=content)
    try:
        status, answer_headers, body = _exchange(settings, request, httpx.Timeout(settings.dicomweb_timeout))
    except httpx.HTTPError as exc:
        raise _transport_error(root, exc, url, study_uid, sop_uid) from None
    outcome(status, answer_headers, body, sop_uid, root)


def web_echo(destination: Destination, settings: Settings) -> None:
    """The DICOMweb counterpart of C-ECHO: a cheap QIDO-RS ``GET {root}/studies?limit=1`` whose
    answer is not read. Any answer below 500 but 408 and 429 (even 401, 403 or 404: a server
    that refuses the query or does not offer QIDO-RS is still up) means the server is there;
    raises :class:`DeliveryError` otherwise."""
    timeout = httpx.Timeout(min(settings.dicomweb_timeout, 10.0), connect=ECHO_CONNECT_TIMEOUT)
    request = httpx.Request(
        "GET", f"{destination.url}/studies", params={"limit": "1"}, headers=_headers(settings, destination)
    )
    try:
        status, _, _ = _exchange(settings, request, timeout, read=0)
    except httpx.HTTPError as exc:
        raise _transport_error(destination.url, exc) from None
    if status >= 500 or status in (408, 429):
        raise DeliveryError(f"DICOMweb probe of {destination.url}: HTTP {status}")
