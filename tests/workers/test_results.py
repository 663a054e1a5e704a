"""Saving a result: rows and outputs for a live job, nothing at all for one cancelled mid-run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select, update

from service.core.header import read_header
from service.core.ingest import index_object
from service.core.models import Delivery, Job, JobState, Result
from service.core.runtime import Runtime
from service.core.settings import Destination
from tests.factories import phantom_cine_file
from workers.pipeline import Analyzer
from workers.results import Saved, save_result


@pytest.mark.parametrize("cancelled", [False, True])
def test_cancelled_while_running_keeps_nothing(runtime: Runtime, tmp_path: Path, cancelled: bool) -> None:
    pacs = runtime.settings.model_copy(update={"default_destination": Destination.parse("PACS@127.0.0.1:1")})
    runtime = replace(runtime, settings=pacs)  # same database and queue, other settings
    store = runtime.store
    f = phantom_cine_file(tmp_path / "cine.dcm", frames=4)
    key, sha, size = store.put_file(f)
    header, _ = read_header(f)
    outcome = index_object(header, key, sha, size, calling_ae=None, ignore_reason=None, db=runtime.db)
    job_id = outcome.job_id
    assert job_id is not None
    analysis = Analyzer(device="cpu").analyze(pydicom.dcmread(f))
    if cancelled:  # the API cancelled it while the worker was analysing
        with runtime.db.session() as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.state = JobState.CANCELLED

    saved = save_result(job_id, analysis, pydicom.dcmread(f), runtime=runtime)
    ids = saved.delivery_ids if saved is not None else None

    with runtime.db.session() as s:
        results = s.scalar(select(func.count()).select_from(Result))
        deliveries = s.scalar(select(func.count()).select_from(Delivery))
    if cancelled:
        assert ids is None and results == 0 and deliveries == 0
    else:
        assert ids and results == 1 and deliveries == len(ids)


def _analysed_and_saved(runtime: Runtime, f: Path) -> Saved:
    """``f`` received (stored, indexed with its job), analysed and saved, as a worker does."""
    key, sha, size = runtime.store.put_file(f)
    header, _ = read_header(f)
    outcome = index_object(header, key, sha, size, calling_ae=None, ignore_reason=None, db=runtime.db)
    assert outcome.job_id is not None
    analysis = Analyzer(device="cpu").analyze(pydicom.dcmread(f))
    saved = save_result(outcome.job_id, analysis, pydicom.dcmread(f), runtime=runtime)
    assert saved is not None
    return saved


def _saved(runtime: Runtime, tmp_path: Path, validation: str) -> tuple[Runtime, int]:
    runtime = replace(runtime, settings=runtime.settings.model_copy(update={"output_validation": validation}))
    saved = _analysed_and_saved(runtime, phantom_cine_file(tmp_path / "cine.dcm", frames=4))
    return runtime, saved.result_id


@pytest.mark.usefixtures("dicom3tools")
def test_the_background_audit_records_what_dicom3tools_say_of_the_stored_outputs(
    runtime: Runtime, tmp_path: Path
) -> None:
    """LUSAI_OUTPUT_VALIDATION=background: stored after the in-process check, audited after."""
    from workers.results import audit_outputs_of

    runtime, result_id = _saved(runtime, tmp_path, "background")
    with runtime.db.session() as s:
        r = s.get(Result, result_id)
        assert r is not None and r.output_audit is None  # pending until the deliver queue runs it
        sr_path = runtime.store.path(r.sr_storage_key or "")
    assert audit_outputs_of(result_id, runtime=runtime) == "passed"
    assert audit_outputs_of(result_id, runtime=runtime) is None  # audited once

    # a stored SR that dicom3tools refuse (no CompletionFlag): the audit says so, without values
    ds = pydicom.dcmread(sr_path)
    del ds.CompletionFlag
    ds.save_as(sr_path, enforce_file_format=True)
    with runtime.db.session() as s:
        s.execute(update(Result).where(Result.id == result_id).values(output_audit=None))
    assert audit_outputs_of(result_id, runtime=runtime) == "failed"
    with runtime.db.session() as s:
        r = s.get(Result, result_id)
        assert r is not None and r.output_audit == "failed"
        assert r.output_audit_detail == "dciodvfy Comprehensive3DSRStorage: 1 error(s)"


@pytest.mark.usefixtures("dicom3tools")
def test_inline_validation_is_recorded_and_not_audited_again(runtime: Runtime, tmp_path: Path) -> None:
    from workers.results import audit_outputs_of

    runtime, result_id = _saved(runtime, tmp_path, "inline")
    with runtime.db.session() as s:
        r = s.get(Result, result_id)
        assert r is not None and r.output_audit == "inline"
    assert audit_outputs_of(result_id, runtime=runtime) is None


@pytest.mark.parametrize(
    ("profiles", "size", "seg_type", "deflated", "sr_groups", "with_sc"),
    [
        ("", (350, 350), "LABELMAP", True, 1, False),  # default (ohif): BINARY would start mid-byte
        ("", (320, 300), "BINARY", True, 1, False),  # 96,000 pixels: a multiple of 16
        ("PACS=archive", (350, 350), "BINARY", True, None, False),
        ("PACS=slicer", (350, 350), "BINARY", False, None, True),
    ],
)
def test_the_destination_s_profile_decides_what_is_written(
    runtime: Runtime,
    tmp_path: Path,
    profiles: str,
    size: tuple[int, int],
    seg_type: str,
    deflated: bool,
    sr_groups: int | None,
    with_sc: bool,
) -> None:
    """The SEG encoding, the SR shape and the overlay SC follow LUSAI_DESTINATION_PROFILES for the
    job's destination, and every object written is queued for it."""
    import numpy as np

    from service.core.settings import Settings
    from tests.factories import save, us_cine
    from workers.training.phantom import make_cine

    settings = Settings(
        data_dir=runtime.settings.data_dir,
        database_url=runtime.settings.database_url,
        default_destination="PACS@127.0.0.1:1",  # type: ignore[arg-type]
        destination_profiles=profiles,  # type: ignore[arg-type]
    )
    runtime = replace(runtime, settings=settings)
    c = make_cine(np.random.default_rng(1), n_frames=3, src=size, kind="convex")
    saved = _analysed_and_saved(runtime, save(us_cine(c.frames), tmp_path / "cine.dcm"))
    with runtime.db.session() as s:
        r = s.get(Result, saved.result_id)
        assert r is not None
        seg_key, sr_key, sc_key = r.seg_storage_key, r.sr_storage_key, r.sc_storage_key
        queued = s.scalar(select(func.count()).select_from(Delivery))
    seg = pydicom.dcmread(runtime.store.path(seg_key), stop_before_pixels=True)
    assert seg.SegmentationType == seg_type
    assert (seg.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99") == deflated
    sr = pydicom.dcmread(runtime.store.path(sr_key))
    (measurements,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    groups = len(measurements.ContentSequence)
    assert groups == sr_groups if sr_groups is not None else groups > 1  # full: a group per finding
    assert (sc_key is not None) == with_sc
    assert queued == 2 + with_sc == len(saved.delivery_ids)  # SEG, SR (and SC): all to PACS
