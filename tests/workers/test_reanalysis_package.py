"""Re-analysis and model packages: output UIDs follow the package, a worker refuses other versions."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from service.core.db import session_scope
from service.core.migrate import upgrade
from service.core.models import Delivery, Job, JobState, Result
from service.core.settings import Settings, get_settings
from service.core.storage import ObjectStore
from service.receive.ingest import index_object
from service.receive.validate import read_header
from tests.factories import phantom_cine_file
from workers.infer.package import DEFAULT_PACKAGE, load_package, write_package
from workers.pipeline import Analyzer
from workers.results import save_result


def _indexed_job(settings: Settings, tmp_path: Path) -> tuple[int, Path]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    f = phantom_cine_file(tmp_path / "cine.dcm", frames=4)
    key, sha, size = ObjectStore(settings.storage).put_file(f)
    header, _ = read_header(f)
    outcome = index_object(header, key, sha, size, calling_ae=None, ignore_reason=None, settings=settings)
    assert outcome.job_id is not None
    return outcome.job_id, f


def _uids(settings: Settings, job_id: int) -> tuple[str, str, str]:
    with session_scope(settings.db_url) as s:
        r = s.scalars(select(Result).where(Result.job_id == job_id)).one()
        return r.seg_sop_instance_uid or "", r.sr_sop_instance_uid or "", r.model_version


def test_output_uids_follow_the_package(data_dir: Path, tmp_path: Path) -> None:
    settings = get_settings().model_copy(update={"default_destination": "PACS@127.0.0.1:1"})
    job_id, f = _indexed_job(settings, tmp_path)
    store = ObjectStore(settings.storage)
    shipped = load_package(DEFAULT_PACKAGE)
    first = Analyzer(shipped, device="cpu").analyze(pydicom.dcmread(f))
    save_result(job_id, first, pydicom.dcmread(f), settings=settings, store=store)
    seg1, sr1, version = _uids(settings, job_id)
    assert version == shipped.version
    # A retry with the same package rewrites the same objects (and queues no second delivery).
    save_result(job_id, first, pydicom.dcmread(f), settings=settings, store=store)
    assert _uids(settings, job_id)[:2] == (seg1, sr1)
    with session_scope(settings.db_url) as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 2
    # Another package, even with the same name and version, makes new objects.
    files = {r: shipped.files[r] for r in ("segmenter_torch", "segmenter_onnx")}
    other = write_package(tmp_path / "other", name=shipped.name, version=shipped.version, files=files)
    second = Analyzer(other, device="cpu").analyze(pydicom.dcmread(f))
    assert second.model.package_sha256 == other.package_sha256 != shipped.package_sha256
    save_result(job_id, second, pydicom.dcmread(f), settings=settings, store=store)
    seg2, sr2, _ = _uids(settings, job_id)
    assert seg2 not in (seg1, "") and sr2 not in (sr1, "")
    with session_scope(settings.db_url) as s:  # the result names the package actually used
        assert s.scalar(select(Result.model_package_sha256)) == other.package_sha256
    sr = store.path(_sr_key(settings, job_id)).read_bytes()
    assert other.package_sha256.encode() in sr  # TID 4019 parameters and device serial number


def _sr_key(settings: Settings, job_id: int) -> str:
    with session_scope(settings.db_url) as s:
        key = s.scalars(select(Result.sr_storage_key).where(Result.job_id == job_id)).one()
        assert key is not None
        return key


def test_worker_fails_a_job_for_another_model_version(data_dir: Path, tmp_path: Path) -> None:
    from workers import tasks

    settings = get_settings()
    job_id, _ = _indexed_job(settings, tmp_path)
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.model_version = "9.9.9"
    assert tasks.analyze(job_id) == "failed"  # at once: every worker of a deployment runs one package
    shipped = load_package(DEFAULT_PACKAGE)
    with session_scope(settings.db_url) as s:
        job = s.get(Job, job_id)
        assert job is not None and job.state == JobState.FAILED and job.attempts == 1
        assert job.error is not None and "model version 9.9.9 is not on this worker" in job.error
        assert f"{shipped.name} {shipped.version}, package {shipped.package_sha256[:12]}" in job.error


@pytest.fixture(autouse=True)
def _fresh_worker_model() -> object:
    from workers import tasks

    tasks._analyzer = None
    yield
    tasks._analyzer = None
