"""STOW-RS on the API (PS3.18 10.5): multipart/related parts take the C-STORE ingest path, and the
answer is the standard store response in application/dicom+json."""

from __future__ import annotations

import io
import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import ComprehensiveSRStorage, generate_uid
from sqlalchemy import select

from service.core.models import AuditEvent, Instance, Job, JobState
from tests.factories import noise_frames, us_cine
from tests.service.api.conftest import Api, make_sqlite_api

FAILED, REFERENCED = "00081198", "00081199"
CLASS_UID, INSTANCE_UID, REASON = "00081150", "00081155", "00081197"


def cine_bytes(seed: int = 0, **kw: Any) -> bytes:
    ds = us_cine(noise_frames(3, 32, 40, seed), **kw)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def related(*parts: bytes | tuple[bytes, str], boundary: str | None = None) -> tuple[bytes, str]:
    """A multipart/related body of ``parts`` (bytes, or (bytes, part content type)) and its type."""
    boundary = boundary or secrets.token_hex(12)
    out = bytearray()
    for part in parts:
        data, ctype = part if isinstance(part, tuple) else (part, "application/dicom")
        out += f"--{boundary}\r\nContent-Type: {ctype}\r\n\r\n".encode() + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return bytes(out), f'multipart/related; type="application/dicom"; boundary={boundary}'


def stow(api: Api, body: bytes, ctype: str, url: str = "/dicom-web/studies", scope: str = "write") -> Any:
    return api.post(url, scope=scope, content=body, headers={"Content-Type": ctype})


def items(answer: dict[str, Any], seq: str) -> list[dict[str, Any]]:
    return list(answer.get(seq, {}).get("Value", []))


def uid_of(item: dict[str, Any], tag: str = INSTANCE_UID) -> str | None:
    return item[tag]["Value"][0] if tag in item else None


def test_two_parts_are_stored_and_queued_like_a_c_store(api: Api) -> None:
    a, b = cine_bytes(1), cine_bytes(2, series_description="LUS L2")
    r = stow(api, *related(a, b))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    answer = r.json()
    assert FAILED not in answer
    stored = items(answer, REFERENCED)
    uids = [str(pydicom.dcmread(io.BytesIO(x)).SOPInstanceUID) for x in (a, b)]
    assert [uid_of(i) for i in stored] == uids
    assert {uid_of(i, CLASS_UID) for i in stored} == {"1.2.840.10008.5.1.4.1.1.3.1"}
    with api.session() as s:
        for uid, data in zip(uids, (a, b), strict=True):
            inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == uid))
            assert inst is not None and inst.calling_ae is None
            assert api.store.path(inst.storage_key).read_bytes() == data  # byte for byte
            job = s.scalar(select(Job).where(Job.instance_id == inst.id))
            assert job is not None and job.state == JobState.QUEUED
    assert len(list((api.settings.broker_dir / "queue").iterdir())) == 2
    again = stow(api, *related(a))  # a duplicate is stored (already): success, as for C-STORE
    assert again.status_code == 200 and uid_of(items(again.json(), REFERENCED)[0]) == uids[0]
    assert not list(api.store.tmp_dir.iterdir()), "temporary files left behind"


def test_a_part_that_is_not_dicom_fails_alone(sqlite_api: Api) -> None:
    api = sqlite_api
    good = cine_bytes(3)
    r = stow(api, *related(b"hello, not DICOM" * 10, good, (b"{}", "application/json")))
    assert r.status_code == 202, r.text
    answer = r.json()
    assert [uid_of(i) for i in items(answer, REFERENCED)] == [
        str(pydicom.dcmread(io.BytesIO(good)).SOPInstanceUID)
    ]
    failed = items(answer, FAILED)
    assert [i[REASON]["Value"][0] for i in failed] == [0xC000, 0xC000]
    assert all(INSTANCE_UID not in i for i in failed)  # unreadable: no UIDs to name
    none = stow(api, *related(b"garbage"))
    assert none.status_code == 409 and items(none.json(), FAILED)[0][REASON]["Value"] == [0xC000]
    sr = us_cine(np.zeros((1, 8, 8), np.uint8), sop_class=ComprehensiveSRStorage)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    refused = stow(api, *related(buf.getvalue()))
    assert refused.status_code == 409
    (item,) = items(refused.json(), FAILED)
    assert item[REASON]["Value"] == [0x0122] and uid_of(item) == sr.SOPInstanceUID  # SOP class not supported
    assert not list(api.store.tmp_dir.iterdir())


def test_wrong_media_types_and_malformed_bodies(sqlite_api: Api) -> None:
    api = sqlite_api
    data = cine_bytes(4)
    for ctype in ("application/dicom", "multipart/form-data; boundary=x", "text/plain",
                  'multipart/related; type="application/dicom+json"; boundary=x'):  # fmt: skip
        r = stow(api, data, ctype)
        assert r.status_code == 415 and r.headers["content-type"] == "application/problem+json", ctype
    body, _ = related(data)
    assert stow(api, body, 'multipart/related; type="application/dicom"').status_code == 400  # no boundary
    assert stow(api, b"", related(boundary="abc")[1]).status_code == 400  # no parts
    assert stow(api, body, related()[1], scope="read").status_code == 403
    assert (
        api.client.post(
            "/dicom-web/studies", content=body, headers={"Content-Type": related()[1]}
        ).status_code
        == 401
    )
    truncated = body[: len(body) // 2]  # the client gave up mid-part: that part failed
    r = stow(api, truncated, "multipart/related; type=application/dicom; boundary=" + body[2:26].decode())
    assert r.status_code == 409 and items(r.json(), FAILED)[0][REASON]["Value"] == [0xC000]
    # without the type parameter (some clients leave it out) the parts are still application/dicom
    ok = stow(api, body, "multipart/related; boundary=" + body[2:26].decode())
    assert ok.status_code == 200, ok.text
    assert not list(api.store.tmp_dir.iterdir())


def test_a_part_of_another_study_fails_with_a900(sqlite_api: Api) -> None:
    api = sqlite_api
    study = generate_uid()
    mine, other = cine_bytes(5, study_uid=study), cine_bytes(6)
    r = stow(api, *related(mine, other), url=f"/dicom-web/studies/{study}")
    assert r.status_code == 202, r.text
    (failed,) = items(r.json(), FAILED)
    assert failed[REASON]["Value"] == [0xA900]
    assert uid_of(failed) == str(pydicom.dcmread(io.BytesIO(other)).SOPInstanceUID)
    (stored,) = items(r.json(), REFERENCED)
    assert uid_of(stored) == str(pydicom.dcmread(io.BytesIO(mine)).SOPInstanceUID)
    with api.session() as s:  # the other study's object was not kept
        assert s.scalar(select(Instance).where(Instance.sop_instance_uid == uid_of(failed))) is None
    assert stow(api, *related(other), url=f"/dicom-web/studies/{study}").status_code == 409
    assert stow(api, *related(mine), url="/dicom-web/studies/not-a-uid").status_code == 422
    with api.session() as s:  # every STOW-RS request is audited like an /api/ one
        routes = list(s.scalars(select(AuditEvent.route)))
    assert routes.count("/dicom-web/studies/{study}") == 3


def test_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> None:
    gen = make_sqlite_api(sqlite_template, tmp_path, monkeypatch, max_object_bytes=8192)
    api = next(gen)
    small = cine_bytes(7)
    big = us_cine(noise_frames(4, 64, 64, 8))
    buf = io.BytesIO()
    big.save_as(buf, enforce_file_format=True)
    assert len(small) < 8192 < len(buf.getvalue())
    r = stow(api, *related(buf.getvalue()))
    assert r.status_code == 413 and r.headers["content-type"] == "application/dicom+json"
    assert items(r.json(), FAILED)[0][REASON]["Value"] == [0xA700]
    both = stow(api, *related(buf.getvalue(), small))  # the part after a refused one still counts
    assert both.status_code == 202
    assert [i[REASON]["Value"][0] for i in items(both.json(), FAILED)] == [0xA700]
    assert len(items(both.json(), REFERENCED)) == 1
    assert not list(api.store.tmp_dir.iterdir())
    gen.close()


def test_a_part_split_across_many_small_chunks(sqlite_api: Api) -> None:
    """The parser is fed as the body arrives: a boundary cut between two chunks is still found."""
    body, ctype = related(cine_bytes(9), cine_bytes(10))

    def trickle() -> Any:
        for i in range(0, len(body), 7):
            yield body[i : i + 7]

    r = sqlite_api.post("/dicom-web/studies", content=trickle(), headers={"Content-Type": ctype})
    assert r.status_code == 200 and len(items(r.json(), REFERENCED)) == 2
