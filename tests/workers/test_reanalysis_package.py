"""Re-analysis and model packages: output UIDs follow the package that made them."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
from sqlalchemy import func, select

from service.core.header import read_header
from service.core.ingest import index_object
from service.core.model_package import DEFAULT_PACKAGE, load_package, write_package
from service.core.models import Delivery, Result
from service.core.runtime import Runtime
from service.core.settings import Destination
from tests.factories import phantom_cine_file
from workers.pipeline import Analyzer
from workers.results import save_result


def _indexed_job(runtime: Runtime, tmp_path: Path) -> tuple[int, Path]:
    f = phantom_cine_file(tmp_path / "cine.dcm", frames=4)
    key, sha, size = runtime.store.put_file(f)
    header, _ = read_header(f)
    outcome = index_object(header, key, sha, size, calling_ae=None, ignore_reason=None, db=runtime.db)
    assert outcome.job_id is not None
    return outcome.job_id, f


def _uids(runtime: Runtime, job_id: int) -> tuple[str, str, str]:
    with runtime.db.session() as s:
        r = s.scalars(select(Result).where(Result.job_id == job_id)).one()
        return r.seg_sop_instance_uid or "", r.sr_sop_instance_uid or "", r.model_version


def test_output_uids_follow_the_package(runtime: Runtime, tmp_path: Path) -> None:
    pacs = runtime.settings.model_copy(update={"default_destination": Destination.parse("PACS@127.0.0.1:1")})
    runtime = replace(runtime, settings=pacs)  # same database and queue, other settings
    job_id, f = _indexed_job(runtime, tmp_path)
    store = runtime.store
    shipped = load_package(DEFAULT_PACKAGE)
    first = Analyzer(shipped, device="cpu").analyze(pydicom.dcmread(f))
    save_result(job_id, first, pydicom.dcmread(f), runtime=runtime)
    seg1, sr1, version = _uids(runtime, job_id)
    assert version == shipped.version
    # A retry with the same package rewrites the same objects (and queues no second delivery).
    save_result(job_id, first, pydicom.dcmread(f), runtime=runtime)
    assert _uids(runtime, job_id)[:2] == (seg1, sr1)
    with runtime.db.session() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 2
    # Another package, even with the same name and version, makes new objects.
    files = {r: shipped.files[r] for r in ("segmenter_torch", "segmenter_onnx")}
    other = write_package(tmp_path / "other", name=shipped.name, version=shipped.version, files=files)
    second = Analyzer(other, device="cpu").analyze(pydicom.dcmread(f))
    assert second.model.package_sha256 == other.package_sha256 != shipped.package_sha256
    save_result(job_id, second, pydicom.dcmread(f), runtime=runtime)
    seg2, sr2, _ = _uids(runtime, job_id)
    assert seg2 not in (seg1, "") and sr2 not in (sr1, "")
    with runtime.db.session() as s:  # the result names the package actually used
        assert s.scalar(select(Result.model_package_sha256)) == other.package_sha256
    sr = store.path(_sr_key(runtime, job_id)).read_bytes()
    assert other.package_sha256.encode() in sr  # TID 4019 parameters and device serial number


def _sr_key(runtime: Runtime, job_id: int) -> str:
    with runtime.db.session() as s:
        key = s.scalars(select(Result.sr_storage_key).where(Result.job_id == job_id)).one()
        assert key is not None
        return key
