"""Interoperability of lusai's STOW-RS origin server with a real client: Orthanc's DICOMweb
plugin, told to send a cine to lusai (``POST /dicom-web/servers/lusai/stow``), stores it through
lusai's API with an API key, and lusai ingests it as it would a C-STORE."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import uvicorn
from sqlalchemy import select

from service.core.models import Instance, Job, JobState
from tests.conftest import ORTHANC_DICOMWEB_PLUGIN, broker_messages, free_port
from tests.factories import noise_cine_file
from tests.service.api.conftest import Api, make_sqlite_api

pytestmark = [pytest.mark.network]


@pytest.fixture
def served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sqlite_template: Path
) -> Iterator[tuple[Api, int]]:
    """The API on a real socket (uvicorn in a thread), as Orthanc must reach it: (api, port)."""
    gen = make_sqlite_api(sqlite_template, tmp_path, monkeypatch)
    api = next(gen)
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(api.client.app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield api, port
    server.should_exit = True
    thread.join(timeout=20)
    gen.close()


def test_orthanc_stows_a_cine_to_lusai(served: tuple[Api, int], orthanc_server: Any, tmp_path: Path) -> None:
    api, port = served
    lusai = {"Url": f"http://127.0.0.1:{port}/dicom-web/", "HttpHeaders": {"X-API-Key": api.tokens["write"]}}
    orthanc = orthanc_server(
        [ORTHANC_DICOMWEB_PLUGIN],
        DicomWeb={"Enable": True, "Root": "/dicom-web/", "Servers": {"lusai": lusai}},
    )
    cine = noise_cine_file(tmp_path / "cine.dcm", frames=12, jpeg=True, series_description="LUS R2")
    src = pydicom.dcmread(cine, stop_before_pixels=True)
    with orthanc.client() as c:
        stored = c.post("/instances", content=cine.read_bytes())
        assert stored.status_code == 200, stored.text
        t0 = time.perf_counter()
        sent = c.post("/dicom-web/servers/lusai/stow", json={"Resources": [stored.json()["ID"]]})
        elapsed = time.perf_counter() - t0
        assert sent.status_code == 200, sent.text + orthanc.log.read_text()[-2000:]
    print(f"\nOrthanc -> lusai STOW-RS of a 12-frame JPEG cine: {elapsed * 1000:.0f} ms")
    with api.session() as s:
        inst = s.scalar(select(Instance).where(Instance.sop_instance_uid == src.SOPInstanceUID))
        assert inst is not None, orthanc.log.read_text()[-2000:]
        assert api.store.path(inst.storage_key).read_bytes() == cine.read_bytes()  # byte for byte
        job = s.scalar(select(Job).where(Job.instance_id == inst.id))
        assert job is not None and job.state == JobState.QUEUED  # analysed like a C-STORE
    assert [m.args for m in broker_messages(api.settings)] == [[job.id]]
    # a client without a valid key is refused, and Orthanc reports the failure
    orthanc.stop()
    orthanc.config["DicomWeb"]["Servers"]["lusai"]["HttpHeaders"] = {"X-API-Key": "lusai_wrong"}
    orthanc.start()
    with orthanc.client() as c:
        refused = c.post("/dicom-web/servers/lusai/stow", json={"Resources": [stored.json()["ID"]]})
    assert refused.status_code >= 400
