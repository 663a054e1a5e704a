"""A peer that does not know a SOP class (a PACS older than the Label Map Segmentation class):
one attempt, dead at once with a reason that says what to change; a peer that knows it stores it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from service.core.models import Delivery, DeliveryState
from service.core.runtime import Runtime
from tests.conftest import run_storescp
from tests.factories import make_analysis, make_source
from tests.rows import get_row, stored_delivery
from workers.deliver.outbox import send_delivery
from workers.write_dicom.build import SEG_ENCODINGS, OutputOptions, build_outputs

pytestmark = pytest.mark.network


def _labelmap_seg(tmp_path: Path) -> Path:
    source = make_source(50, 70, 3, jpeg=False)
    options = OutputOptions(seg=SEG_ENCODINGS["labelmap-deflated"], sr=False)
    seg = build_outputs(source, make_analysis(source), options=options)[0].dataset
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    return path


def test_a_peer_without_the_sop_class_dead_letters_at_once(runtime: Runtime, tmp_path: Path) -> None:
    path = _labelmap_seg(tmp_path)
    # DCMTK 3.6.7's storescp (as Orthanc 1.10) does not know 1.2.840.10008.5.1.4.1.1.66.7
    with run_storescp(tmp_path / "received", "PACS", "+xa") as port:
        did, _ = stored_delivery(runtime, tmp_path, f"PACS@127.0.0.1:{port}", file=path)
        assert send_delivery(did, runtime=runtime) == ("dead", None)
    d = get_row(runtime, Delivery, did)
    assert d.state == DeliveryState.DEAD and d.attempts == 1
    assert "does not accept SOP class 1.2.840.10008.5.1.4.1.1.66.7" in (d.last_error or "")
    assert "LUSAI_DESTINATION_PROFILES" in (d.last_error or "")


def test_a_peer_that_takes_any_sop_class_stores_it(runtime: Runtime, tmp_path: Path) -> None:
    path = _labelmap_seg(tmp_path)
    received = tmp_path / "received"
    with run_storescp(received, "PACS", "+xa", "--promiscuous") as port:
        did, uid = stored_delivery(runtime, tmp_path, f"PACS@127.0.0.1:{port}", file=path)
        assert send_delivery(did, runtime=runtime) == ("delivered", None)
    (got,) = [pydicom.dcmread(p) for p in received.iterdir()]
    assert got.SOPInstanceUID == uid and got.SegmentationType == "LABELMAP"
