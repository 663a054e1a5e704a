"""Upload over HTTP takes the C-STORE ingest path: same validation, storage, rows and queueing."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import ComprehensiveSRStorage
from sqlalchemy import select

from service.core.models import Instance, Job, JobState
from tests.factories import MALFORMED_HEADERS, malformed_header_cine, noise_frames, us_cine
from tests.service.api.conftest import Api, make_sqlite_api


def _cine_bytes(seed: int = 0, **kw: object) -> bytes:
    ds = us_cine(noise_frames(3, 32, 40, seed), **kw)  # type: ignore[arg-type]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_upload_raw_and_multipart(api: Api) -> None:
    data = _cine_bytes(1, series_description="LUS L2")
    r = api.post("/api/v1/instances", content=data, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 202, r.text
    body = r.json()
    assert body["outcome"] == "queued" and body["version"] == 1 and body["job_id"]
    assert r.headers["location"] == f"/api/v1/instances/{body['sop_instance_uid']}?version=1"
    inst = api.get(r.headers["location"]).json()
    assert inst["latest_job"]["id"] == body["job_id"] and inst["latest_job"]["state"] == "queued"
    with api.session() as s:
        row = s.scalar(select(Instance).where(Instance.sop_instance_uid == body["sop_instance_uid"]))
        assert row is not None and row.calling_ae is None
        assert api.store.path(row.storage_key).read_bytes() == data
        job = s.get(Job, body["job_id"])
        assert job is not None and job.state == JobState.QUEUED
    assert list((api.settings.broker_dir / "queue").glob("*")), "no message on the embedded broker"
    dup = api.post("/api/v1/instances", content=data, headers={"Content-Type": "application/dicom"})
    assert dup.status_code == 200 and dup.json()["outcome"] == "duplicate"
    other = _cine_bytes(2)
    r = api.post("/api/v1/instances", files={"file": ("clip.dcm", other, "application/dicom")})
    assert r.status_code == 202 and r.json()["outcome"] == "queued"
    assert api.get("/api/v1/studies", params={"patient_id": "PHANTOM-1"}).json()["items"]


def test_upload_rejections(sqlite_api: Api) -> None:
    api = sqlite_api
    r = api.post("/api/v1/instances", content=b"hello", headers={"Content-Type": "application/dicom"})
    assert r.status_code == 422 and r.json()["type"] == "urn:lusai:problem:rejected-object"
    ct = api.post("/api/v1/instances", content=_cine_bytes(), headers={"Content-Type": "text/plain"})
    assert ct.status_code == 415 and ct.headers["content-type"] == "application/problem+json"
    empty = api.post("/api/v1/instances", content=b"", headers={"Content-Type": "application/dicom"})
    assert empty.status_code == 400
    nofile = api.post("/api/v1/instances", files={"other": ("x", b"abc")})
    assert nofile.status_code == 400
    sr = us_cine(np.zeros((1, 8, 8), np.uint8), sop_class=ComprehensiveSRStorage)
    buf = io.BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    unsupported = api.post(
        "/api/v1/instances", content=buf.getvalue(), headers={"Content-Type": "application/dicom"}
    )
    assert unsupported.status_code == 415 and "SOP class" in unsupported.json()["detail"]
    ro = api.post(
        "/api/v1/instances",
        scope="read",
        content=_cine_bytes(),
        headers={"Content-Type": "application/dicom"},
    )
    assert ro.status_code == 403
    assert not list(api.store.tmp_dir.iterdir()), "temporary files left behind"


def test_upload_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> None:
    gen = make_sqlite_api(sqlite_template, tmp_path, monkeypatch, max_object_bytes=2048)
    api = next(gen)
    big = _cine_bytes()
    assert len(big) > 2048
    for kw in ({"content": big, "headers": {"Content-Type": "application/dicom"}},
               {"files": {"file": ("clip.dcm", big, "application/dicom")}}):  # fmt: skip
        r = api.post("/api/v1/instances", **kw)  # type: ignore[arg-type]
        assert r.status_code == 413 and r.json()["type"] == "urn:lusai:problem:content-too-large"
    assert not list(api.store.tmp_dir.iterdir())
    gen.close()


@pytest.mark.parametrize("case", MALFORMED_HEADERS)
def test_upload_of_a_header_pydicom_cannot_parse_is_422(sqlite_api: Api, case: str) -> None:
    """Found by bench/chaos/fuzz.py: these raised past the route's handlers (500)."""
    data = malformed_header_cine(case)
    r = sqlite_api.post("/api/v1/instances", content=data, headers={"Content-Type": "application/dicom"})
    assert r.status_code == 422 and "unreadable" in r.json()["detail"], r.text
    assert not list(sqlite_api.store.tmp_dir.iterdir())


@pytest.mark.parametrize(("errno_", "status"), [(5, 503), (116, 503), (28, 507)])  # EIO, ESTALE, ENOSPC
def test_a_store_that_cannot_be_written_is_a_clear_problem(
    sqlite_api: Api, monkeypatch: pytest.MonkeyPatch, errno_: int, status: int
) -> None:
    """The shared mount gone (EIO, ESTALE) is a 503 to send again, a full store a 507; never a bare
    500, and nothing is indexed (bench: tests/service/core/test_storage_shared.py)."""
    import os

    api = sqlite_api

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(api.store, "adopt", broken)
    r = api.post("/api/v1/instances", content=_cine_bytes(3), headers={"Content-Type": "application/dicom"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    with api.session() as s:
        assert s.scalar(select(Instance)) is None
    assert not list(api.store.tmp_dir.iterdir())
