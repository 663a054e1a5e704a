"""``lusai send`` into lusai's own SCP, and the SCP's choice of transfer syntax per proposed context.

A JPEG cine is what scanners export most; lusai must store it as sent (JPEG Baseline), whether the
sender proposes JPEG alone (``lusai send``) or JPEG with uncompressed fallbacks it would have to
transcode to.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundMultiFrameImageStorage,
)
from pynetdicom import AE
from typer.testing import CliRunner

from service.cli import app
from tests.factories import phantom_cine_file
from tests.service.receive.conftest import Running

pytestmark = pytest.mark.network


def _stored_syntaxes(scp: Running) -> dict[str, str]:
    """SOP Instance UID -> transfer syntax of the file lusai stored, read back from storage."""
    out = {}
    for inst in scp.instances():
        ds = pydicom.dcmread(scp.store.path(inst.storage_key), stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = str(ds.file_meta.TransferSyntaxUID)
    return out


def test_send_mixed_folder_to_lusai_keeps_jpeg(scp: Running, tmp_path: Path) -> None:
    folder = tmp_path / "export" / "patient_1"
    folder.mkdir(parents=True)
    sent = [phantom_cine_file(folder / f"L{i}.dcm", frames=4, seed=i, jpeg=i % 2 == 0) for i in range(1, 5)]
    (folder / "notes.txt").write_text("not DICOM")
    to = f"LUSAI@127.0.0.1:{scp.port}"
    result = CliRunner().invoke(app, ["send", str(tmp_path / "export"), "--to", to])
    assert result.exit_code == 0, result.output
    assert "sent 4/4" in result.output and "1 skipped" in result.output
    stored = _stored_syntaxes(scp)
    assert len(stored) == 4
    for f in sent:
        src = pydicom.dcmread(f, stop_before_pixels=True)
        assert stored[str(src.SOPInstanceUID)] == str(src.file_meta.TransferSyntaxUID)
    assert sorted(stored.values()).count(JPEGBaseline8Bit) == 2


def test_scp_agrees_on_the_senders_compressed_syntax(scp: Running, tmp_path: Path) -> None:
    """[JPEG, Explicit, Implicit] is agreed as JPEG (stored as sent); an uncompressed proposal as before."""
    us = UltrasoundMultiFrameImageStorage
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(us, [JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    ae.add_requested_context(us, [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="LUSAI")
    assert assoc.is_established
    try:
        agreed = {cx.context_id: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
        assert agreed == {1: JPEGBaseline8Bit, 3: ExplicitVRLittleEndian}
        ds = pydicom.dcmread(phantom_cine_file(tmp_path / "jpeg.dcm", frames=4, jpeg=True))
        status = assoc.send_c_store(ds)
        assert int(status.Status) == 0x0000
    finally:
        assoc.release()
    assert _stored_syntaxes(scp) == {str(ds.SOPInstanceUID): JPEGBaseline8Bit}
