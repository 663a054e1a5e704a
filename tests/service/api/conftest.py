"""Fixtures of the REST API tests: the app on each test database (SQLite, and PostgreSQL when
reachable: ``tests/service/conftest.py``) with one key per scope, and real stored objects (source
cine, SEG, SR) for results."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage, generate_uid

from service.core.models import Instance, InstanceState, Job, JobState, Result, Series, Study
from service.core.runtime import Runtime
from service.core.settings import Settings
from tests.conftest import OnRuntime
from tests.factories import us_cine
from tests.service.conftest import database_url


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return database_url(request, request.param, tmp_path)


@dataclass
class Api(OnRuntime):
    """The app under test and handles on its state: the runtime it was built on, which it shares."""

    client: TestClient
    tokens: dict[str, str] = field(default_factory=dict)

    def headers(self, scope: str = "read") -> dict[str, str]:
        return {"X-API-Key": self.tokens[scope]}

    def get(self, url: str, scope: str = "read", **kw: Any) -> Any:
        return self.client.get(url, headers={**self.headers(scope), **kw.pop("headers", {})}, **kw)

    def post(self, url: str, scope: str = "write", **kw: Any) -> Any:
        return self.client.post(url, headers={**self.headers(scope), **kw.pop("headers", {})}, **kw)

    def session(self) -> Any:
        return self.runtime.db.session()


def make_api(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any) -> Iterator[Api]:
    """The app on ``db_url`` and its own runtime; the environment is set too, for the CLI commands
    a test runs beside it (they build their own runtime from it, as in production)."""
    from service.api.auth import create_api_key
    from service.api.main import create_app

    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    monkeypatch.setenv("LUSAI_DATA_DIR", str(data))
    monkeypatch.setenv("LUSAI_DATABASE_URL", db_url)
    for var in ("LUSAI_BROKER_URL", "LUSAI_STORAGE_ROOT", "LUSAI_API_KEYS_REQUIRED"):
        monkeypatch.delenv(var, raising=False)
    for key, value in overrides.items():
        monkeypatch.setenv(f"LUSAI_{key.upper()}", str(value))
    with Runtime.from_settings(Settings()) as runtime:
        tokens = {}
        with runtime.db.session() as s:
            for scope in ("read", "write", "admin"):
                _row, tokens[scope] = create_api_key(s, f"test-{scope}", [scope], rate_limit=0)
        with TestClient(create_app(runtime), raise_server_exceptions=False) as client:
            yield Api(client=client, runtime=runtime, tokens=tokens)


@pytest.fixture
def api(db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Api]:
    yield from make_api(db_url, tmp_path, monkeypatch)


@pytest.fixture
def sqlite_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path) -> Iterator[Api]:
    """The app on SQLite only, for tests about the HTTP layer rather than the database."""
    yield from make_sqlite_api(sqlite_template, tmp_path, monkeypatch)


def make_sqlite_api(
    template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **overrides: Any
) -> Iterator[Api]:
    """The app on a fresh copy of the migrated SQLite template, with settings ``overrides``."""
    target = tmp_path / "lusai.sqlite"
    shutil.copy(template, target)
    yield from make_api(f"sqlite:///{target}", tmp_path, monkeypatch, **overrides)


# --- stored objects -----------------------------------------------------------------------------

FRAMES, ROWS, COLS = 4, 48, 64


def source_frames() -> np.ndarray:
    """A gray ramp, so overlay colours are easy to tell from the background."""
    ramp = np.tile(np.linspace(40, 200, COLS, dtype=np.uint8), (ROWS, 1))
    return np.stack([ramp] * FRAMES)


def class_maps() -> np.ndarray:
    """Frame f has B-line (3) in columns 10-19 and pleura (1) in row band 5-7; frame 2 has none."""
    labels = np.zeros((FRAMES, ROWS, COLS), dtype=np.uint8)
    for f in (0, 1, 3):
        labels[f, 5:8, :] = 1
        labels[f, 10:40, 10:20] = 3
    return labels


def build_seg(source: Dataset, labels: np.ndarray, frames_written: list[int]) -> Dataset:
    """A BINARY SEG shaped like workers/write_dicom's: one frame per (segment, source frame),
    each naming its segment and its source frame in the per-frame functional groups."""
    ds = Dataset()
    ds.SOPClassUID = SegmentationStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = source.StudyInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "SEG"
    ds.SegmentationType = "BINARY"
    ds.Rows, ds.Columns = source.Rows, source.Columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 1, 1, 0, 0
    segs = []
    for number, label in ((1, "Pleural line"), (3, "B-line")):
        item = Dataset()
        item.SegmentNumber = number
        item.SegmentLabel = label
        segs.append(item)
    ds.SegmentSequence = segs
    groups = []
    planes = []
    for number in (1, 3):
        for f in frames_written:
            g = Dataset()
            ident = Dataset()
            ident.ReferencedSegmentNumber = number
            g.SegmentIdentificationSequence = [ident]
            src = Dataset()
            src.ReferencedSOPClassUID = source.SOPClassUID
            src.ReferencedSOPInstanceUID = source.SOPInstanceUID
            src.ReferencedFrameNumber = f + 1
            der = Dataset()
            der.SourceImageSequence = [src]
            g.DerivationImageSequence = [der]
            fc = Dataset()
            fc.TemporalPositionIndex = frames_written.index(f) + 1  # position in the selection
            g.FrameContentSequence = [fc]
            groups.append(g)
            planes.append((labels[f] == number).astype(np.uint8))
    ds.PerFrameFunctionalGroupsSequence = groups
    ds.NumberOfFrames = len(planes)
    ds.PixelData = pack_bits(np.stack(planes))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def _store(api: Api, ds: Dataset, tmp: Path) -> tuple[str, str, int]:
    path = tmp / f"{uuid.uuid4().hex}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return api.store.put_file(path)


@dataclass
class Seeded:
    study_uid: str
    sop_uids: list[str]
    result_ids: list[int]
    job_ids: list[int]
    seg_bytes: bytes | None = None


def seed_study(
    api: Api,
    tmp: Path,
    *,
    zones: list[tuple[str, int | None]],
    patient_id: str = "PAT-1",
    accession: str = "ACC-1",
    study_date: str = "20260105",
    calling_ae: str = "MODALITY1",
    with_seg: bool = True,
    seg_frames: list[int] | None = None,
    previews: bool = True,
) -> Seeded:
    """A study with one cine per (series description, score), each analysed with a stored result;
    a score of None is a clip that was not gradable (reason ``no-pleura``). ``previews``: render
    them as the worker does; False leaves a result as analysed before previews were stored."""
    study_uid = generate_uid()
    out = Seeded(study_uid=study_uid, sop_uids=[], result_ids=[], job_ids=[])
    now = datetime.now(UTC)
    with api.session() as s:
        study = Study(
            study_instance_uid=study_uid,
            patient_id=patient_id,
            accession_number=accession,
            study_date=study_date,
            study_description="Lung ultrasound",
        )
        s.add(study)
        s.flush()
        for i, (desc, score) in enumerate(zones):
            src = us_cine(source_frames(), study_uid=study_uid, series_description=desc)
            key, sha, size = _store(api, src, tmp)
            series = Series(
                series_instance_uid=src.SeriesInstanceUID,
                study_id=study.id,
                modality="US",
                series_number=i + 1,
                series_description=desc,
                body_part="CHEST",
            )
            s.add(series)
            s.flush()
            inst = Instance(
                sop_instance_uid=src.SOPInstanceUID,
                version=1,
                series_id=series.id,
                sop_class_uid=src.SOPClassUID,
                transfer_syntax_uid=ExplicitVRLittleEndian,
                frames=FRAMES,
                rows=ROWS,
                columns=COLS,
                photometric="MONOCHROME2",
                calling_ae=calling_ae,
                storage_key=key,
                sha256=sha,
                size_bytes=size,
                state=InstanceState.ACCEPTED,
                received_at=now + timedelta(seconds=i),
            )
            s.add(inst)
            s.flush()
            job = Job(
                instance_id=inst.id,
                state=JobState.SUCCEEDED,
                attempts=1,
                model_version="1.0.0",
                timings_ms={"decode": 12.5, "infer": 80.0, "write": 5.0},
                finished_at=now,
            )
            s.add(job)
            s.flush()
            seg_key = seg_uid = sr_key = None
            if with_seg:
                seg = build_seg(src, class_maps(), seg_frames if seg_frames is not None else [0, 1, 3])
                seg_key, _, _ = _store(api, seg, tmp)
                seg_uid = str(seg.SOPInstanceUID)
                out.seg_bytes = api.store.path(seg_key).read_bytes()
                sr = Dataset()
                sr.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
                sr.SOPInstanceUID = generate_uid()
                sr.Modality = "SR"
                sr.file_meta = FileMetaDataset()
                sr.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
                sr.file_meta.MediaStorageSOPClassUID = sr.SOPClassUID
                sr.file_meta.MediaStorageSOPInstanceUID = sr.SOPInstanceUID
                sr_key, _, _ = _store(api, sr, tmp)
            rule = 0 if score is None else score  # what the score rule gave an ungradable clip
            result = Result(
                job_id=job.id,
                instance_id=inst.id,
                score=score,
                gradable=score is not None,
                ungradable_reason=None if score is not None else "no-pleura",
                frame_scores=[rule, max(rule - 1, 0), 0, rule],
                key_frame=0,
                b_line_fraction=0.2,
                b_line_count=2,
                consolidation=score == 3,
                effusion=False,
                measurements={"bla_score": 0.5, "frames": []},
                model_name="lusnet",
                model_version="1.0.0",
                weights_sha256="ab" * 32,
                seg_sop_instance_uid=seg_uid,
                seg_storage_key=seg_key,
                sr_sop_instance_uid=None if sr_key is None else "1.2.3.4",
                sr_storage_key=sr_key,
            )
            s.add(result)
            s.flush()
            out.sop_uids.append(str(src.SOPInstanceUID))
            out.result_ids.append(result.id)
            out.job_ids.append(job.id)
    if previews:
        for result_id in out.result_ids:
            render_previews(api, result_id)
    return out


def render_previews(api: Api, result_id: int) -> None:
    """What the worker does when it saves a result: render the previews of the stored source and
    SEG into storage and record their keys (or why it could not) on the result."""
    from workers.write_dicom.previews import Caption, store_previews

    with api.session() as s:
        r = s.get(Result, result_id)
        inst = s.get(Instance, r.instance_id)
        source = pydicom.dcmread(api.store.path(inst.storage_key))
        seg = pydicom.dcmread(api.store.path(r.seg_storage_key)) if r.seg_storage_key else None
        caption = Caption(r.score, f"{r.model_name} {r.model_version}", r.ungradable_reason)
        stored = store_previews(api.store, source, seg, caption, key_frame=r.key_frame, settings=api.settings)
        r.preview_png_key, r.preview_gif_key, r.preview_webp_key = stored.png, stored.gif, stored.webp
        r.preview_error = stored.error
