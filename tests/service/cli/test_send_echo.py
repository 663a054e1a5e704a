"""`lusai send` and `lusai echo` against a real DCMTK storescp, as an administrator uses them."""

from __future__ import annotations

import gc
import importlib
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.association import Association
from typer.testing import CliRunner

from service.cli import app
from tests.conftest import ORTHANC_DICOMWEB_PLUGIN, free_port, run_storescp
from tests.factories import noise_cine_file, phantom_cine_file

send_cli = importlib.import_module("service.cli.send")

pytestmark = pytest.mark.network


def test_send_folder_recursively_keeps_transfer_syntax(storescp: tuple[int, Path], tmp_path: Path) -> None:
    port, received = storescp
    folder = tmp_path / "outgoing" / "nested"
    folder.mkdir(parents=True)
    sent = [phantom_cine_file(folder / f"{i}.dcm", frames=4, seed=i, jpeg=bool(i % 2)) for i in range(3)]
    (folder / "README.txt").write_text("not DICOM")
    result = CliRunner().invoke(app, ["send", str(tmp_path / "outgoing"), "--to", f"PACS@127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    assert "sent 3/3" in result.output and "1 skipped (not DICOM" in result.output
    got = {pydicom.dcmread(p).SOPInstanceUID: pydicom.dcmread(p) for p in received.iterdir()}
    for f in sent:
        src = pydicom.dcmread(f)
        assert got[src.SOPInstanceUID].file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID


def test_send_to_unreachable_peer_fails_cleanly(tmp_path: Path) -> None:
    f = noise_cine_file(tmp_path / "a.dcm")
    result = CliRunner().invoke(app, ["send", str(f), "--to", f"NOBODY@127.0.0.1:{free_port()}"])
    assert result.exit_code == 1 and "association" in result.output


def test_send_rejects_bad_destination(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["send", str(tmp_path), "--to", "not-a-destination"])
    assert result.exit_code == 2


def test_echo(storescp: tuple[int, Path]) -> None:
    port, _ = storescp
    ok = CliRunner().invoke(app, ["echo", "--to", f"PACS@127.0.0.1:{port}"])
    assert ok.exit_code == 0 and "success" in ok.output
    bad = CliRunner().invoke(app, ["echo", "--to", f"PACS@127.0.0.1:{free_port()}"])
    assert bad.exit_code == 1 and "failed" in bad.output


@pytest.fixture
def storescp_uncompressed(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK storescp with its default transfer syntaxes: uncompressed only, so JPEG is refused."""
    out = tmp_path / "received-raw"
    with run_storescp(out, "RAWONLY") as port:
        yield port, out


def test_send_jpeg_to_uncompressed_only_peer_fails_that_file(
    storescp_uncompressed: tuple[int, Path], tmp_path: Path
) -> None:
    port, received = storescp_uncompressed
    jpeg = phantom_cine_file(tmp_path / "a_jpeg.dcm", frames=4, jpeg=True)
    raw = phantom_cine_file(tmp_path / "b_raw.dcm", frames=4, seed=1)
    result = CliRunner().invoke(app, ["send", str(tmp_path), "--to", f"RAWONLY@127.0.0.1:{port}"])
    assert result.exit_code == 1, result.output
    assert result.exc_info is not None and result.exc_info[0] is SystemExit  # typer.Exit, not a crash
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith(str(jpeg))]
    assert lines == [
        f"{jpeg}: the peer did not accept Ultrasound Multi-frame Image Storage in JPEG Baseline (Process 1)"
    ], result.output
    assert "sent 1/2" in result.output
    got = [pydicom.dcmread(p) for p in received.iterdir()]
    assert [str(ds.SOPInstanceUID) for ds in got] == [str(pydicom.dcmread(raw).SOPInstanceUID)]


def test_send_reads_each_file_just_before_its_store(
    storescp: tuple[int, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Memory: a full data set is read only right before its C-STORE, and none is held after it."""
    port, received = storescp
    for i in range(4):
        noise_cine_file(tmp_path / f"{i}.dcm", seed=i, jpeg=bool(i % 2))
    events: list[str] = []
    alive: list[weakref.ref[Dataset]] = []
    real_read, real_store = send_cli._read, Association.send_c_store

    def read(path: Path) -> Dataset:
        gc.collect()
        held = sum(r() is not None for r in alive)
        events.append(f"read({held} held)")
        ds = real_read(path)
        alive.append(weakref.ref(ds))
        return ds

    def store(self: Association, dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        events.append("store")
        return real_store(self, dataset, *args, **kwargs)

    monkeypatch.setattr(send_cli, "_read", read)
    monkeypatch.setattr(Association, "send_c_store", store)
    result = CliRunner().invoke(app, ["send", str(tmp_path), "--to", f"PACS@127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    assert events == ["read(0 held)", "store"] * 4
    assert len(list(received.iterdir())) == 4


def test_send_more_than_128_contexts_in_batches(tmp_path: Path) -> None:
    """130 SOP classes need two associations (128 presentation contexts at most in one)."""
    sop_classes = sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts})[:130]
    assert len(sop_classes) == 130
    for i, sop_class in enumerate(sop_classes):
        ds = Dataset()
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class, generate_uid()
        ds.PatientID = "PHANTOM-1"
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(tmp_path / f"{i:03d}.dcm", enforce_file_format=True)
    stored: list[str] = []
    associations: list[int] = []

    def on_store(event: evt.Event) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    scp = AE(ae_title="MANY")
    scp.supported_contexts = AllStoragePresentationContexts
    port = free_port()
    server = scp.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[
            (evt.EVT_C_STORE, on_store),
            (evt.EVT_ESTABLISHED, lambda event: associations.append(len(event.assoc.accepted_contexts))),
        ],
    )
    try:
        result = CliRunner().invoke(app, ["send", str(tmp_path), "--to", f"MANY@127.0.0.1:{port}"])
    finally:
        server.shutdown()
    assert result.exit_code == 0, result.output
    assert "sent 130/130" in result.output
    assert sorted(associations) == [2, 128]
    assert len(set(stored)) == 130


def test_send_refuses_a_dicomweb_destination(tmp_path: Path) -> None:
    f = noise_cine_file(tmp_path / "a.dcm")
    result = CliRunner().invoke(app, ["send", str(f), "--to", "https://pacs.example.org/dicom-web"])
    assert result.exit_code == 2 and "AET@host:port" in result.output


def test_echo_probes_a_dicomweb_destination(orthanc_server: Any, tmp_path: Path) -> None:
    """`lusai echo --to URL` asks what the delivery sweep asks (QIDO-RS): up, then down."""
    server = orthanc_server(plugins=[ORTHANC_DICOMWEB_PLUGIN])
    url = f"{server.base}/dicom-web"
    result = CliRunner().invoke(app, ["echo", "--to", url])
    assert result.exit_code == 0 and "success" in result.output, result.output
    server.stop()
    result = CliRunner().invoke(app, ["echo", "--to", url])
    assert result.exit_code == 1 and "failed" in result.output, result.output
