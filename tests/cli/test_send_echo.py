"""`lusai send` and `lusai echo` against a real DCMTK storescp, as an administrator uses them."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from typer.testing import CliRunner

from service.cli import app
from tests.conftest import free_port
from tests.factories import noise_cine_file

pytestmark = pytest.mark.network


def test_send_folder_recursively_keeps_transfer_syntax(storescp: tuple[int, Path], tmp_path: Path) -> None:
    port, received = storescp
    folder = tmp_path / "outgoing" / "nested"
    folder.mkdir(parents=True)
    sent = [noise_cine_file(folder / f"{i}.dcm", seed=i, jpeg=bool(i % 2)) for i in range(3)]
    (folder / "README.txt").write_text("not DICOM")
    result = CliRunner().invoke(app, ["send", str(tmp_path / "outgoing"), "--to", f"PACS@127.0.0.1:{port}"])
    assert result.exit_code == 0, result.output
    assert "sent 3/3" in result.output and "1 non-DICOM skipped" in result.output
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
