"""Saving a result: rows and outputs for a live job, nothing at all for one cancelled mid-run."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from sqlalchemy import func, select

from service.core.db import session_scope
from service.core.migrate import upgrade
from service.core.models import Delivery, Job, JobState, Result
from service.core.settings import get_settings
from service.core.storage import ObjectStore
from service.receive.ingest import index_object
from service.receive.validate import read_header
from tests.factories import phantom_cine_file
from workers.pipeline import Analyzer
from workers.results import save_result


@pytest.mark.parametrize("cancelled", [False, True])
def test_cancelled_while_running_keeps_nothing(data_dir: Path, tmp_path: Path, cancelled: bool) -> None:
    settings = get_settings().model_copy(update={"default_destination": "PACS@127.0.0.1:1"})
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    store = ObjectStore(settings.storage)
    f = phantom_cine_file(tmp_path / "cine.dcm", frames=4)
    key, sha, size = store.put_file(f)
    header, _ = read_header(f)
    outcome = index_object(header, key, sha, size, calling_ae=None, ignore_reason=None, settings=settings)
    job_id = outcome.job_id
    assert job_id is not None
    analysis = Analyzer(device="cpu").analyze(pydicom.dcmread(f))
    if cancelled:  # the API cancelled it while the worker was analysing
        with session_scope(settings.db_url) as s:
            job = s.get(Job, job_id)
            assert job is not None
            job.state = JobState.CANCELLED

    ids = save_result(job_id, analysis, pydicom.dcmread(f), settings=settings, store=store)

    with session_scope(settings.db_url) as s:
        results = s.scalar(select(func.count()).select_from(Result))
        deliveries = s.scalar(select(func.count()).select_from(Delivery))
    if cancelled:
        assert ids is None and results == 0 and deliveries == 0
    else:
        assert ids and results == 1 and deliveries == len(ids)
