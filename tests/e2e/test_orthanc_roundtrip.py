"""End to end with a real PACS: Orthanc (Debian package) auto-routes US to lusai, results come back.

storescu → Orthanc → Lua rule (deploy/orthanc/route-to-lusai.lua) → lusai SCP → worker →
SEG + SR C-STOREd back → same study in Orthanc, read back through Orthanc's REST API.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from tests.conftest import REPO, free_port, new_orthanc, serve_for_orthanc, storescu
from tests.factories import phantom_cine_file

pytestmark = [pytest.mark.network, pytest.mark.slow]


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[dict[str, Any]]:
    lusai_port = free_port()
    server = new_orthanc(
        tmp_path / "orthanc",
        DicomModalities={"lusai": ["LUSAI", "127.0.0.1", lusai_port]},
        LuaScripts=[str(REPO / "deploy" / "orthanc" / "route-to-lusai.lua")],
    )
    server.start()
    yield {"base": server.base, "dicom_port": server.dicom_port, "lusai_port": lusai_port, "log": server.log}
    server.stop()


@pytest.fixture
def lusai(tmp_path: Path, orthanc: dict[str, Any]) -> Iterator[Path]:
    with serve_for_orthanc(tmp_path / "lusai", orthanc["lusai_port"], orthanc["dicom_port"]) as log:
        yield log


def _series_by_modality(base: str, study_uid: str) -> dict[str, list[str]]:
    found = httpx.post(
        f"{base}/tools/find", json={"Level": "Study", "Query": {"StudyInstanceUID": study_uid}}
    )
    out: dict[str, list[str]] = {}
    for study_id in found.json():
        for series in httpx.get(f"{base}/studies/{study_id}/series").json():
            out.setdefault(series["MainDicomTags"].get("Modality", ""), []).extend(series["Instances"])
    return out


def test_cine_pushed_to_orthanc_comes_back_with_seg_and_sr(
    orthanc: dict[str, Any], lusai: Path, tmp_path: Path
) -> None:
    frames = int(os.environ.get("LUSAI_E2E_FRAMES", "24"))
    cine = phantom_cine_file(tmp_path / "cine.dcm", frames=frames, jpeg=True)
    src = pydicom.dcmread(cine, stop_before_pixels=True)
    t0 = time.monotonic()
    out = storescu(orthanc["dicom_port"], cine, "ORTHANC")
    assert out.returncode == 0, out.stderr
    base = orthanc["base"]
    series: dict[str, list[str]] = {}
    while time.monotonic() - t0 < 300:
        series = _series_by_modality(base, src.StudyInstanceUID)
        if series.get("SEG") and series.get("SR"):
            break
        time.sleep(0.5)
    elapsed = time.monotonic() - t0
    logs = lusai.read_text()[-4000:] + Path(orthanc["log"]).read_text()[-2000:]
    assert series.get("SEG") and series.get("SR"), f"{series}\n{logs}"
    print(f"\nE2E {frames}-frame cine: C-STORE into Orthanc -> SEG+SR back in Orthanc in {elapsed:.1f} s")
    (tmp_path / "e2e.json").write_text(json.dumps({"frames": frames, "seconds": elapsed}))

    assert len(series["US"]) == 1 and len(series["SEG"]) == 1 and len(series["SR"]) == 1  # no duplicates
    seg = pydicom.dcmread(_download(base, series["SEG"][0]))
    sr = pydicom.dcmread(_download(base, series["SR"][0]))
    for obj in (seg, sr):
        assert obj.StudyInstanceUID == src.StudyInstanceUID
        assert obj.SeriesInstanceUID != src.SeriesInstanceUID
        assert obj.PatientID == src.PatientID
    import highdicom as hd

    segmentation = hd.seg.Segmentation.from_dataset(seg)
    assert int(seg.NumberOfFrames) >= 1
    labels = (
        {d.segment_label for d in segmentation.SegmentSequence}
        if hasattr(segmentation, "SegmentSequence")
        else set()
    )
    assert labels  # coded segments
    ref_uids = {
        r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence for r in s.ReferencedInstanceSequence
    }
    assert src.SOPInstanceUID in ref_uids
    report = hd.sr.srread(_download(base, series["SR"][0]))
    assert report.SOPClassUID == sr.SOPClassUID


def _download(base: str, instance_id: str) -> Any:
    import io

    return io.BytesIO(httpx.get(f"{base}/instances/{instance_id}/file").content)
