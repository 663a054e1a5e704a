"""Every bad input a sender can produce gets a failure status over the network, never a crash.

Each case checks the DIMSE status, that nothing was stored or indexed or queued, that no temporary
file is left behind, and that the SCP still accepts a good object afterwards.
"""

from __future__ import annotations

import errno
import io
import os
import random
import subprocess
import time
from pathlib import Path

import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, UltrasoundMultiFrameImageStorage

from service.receive import pynetdicom_adapter
from tests.factories import cine, frames_array, save
from tests.service.receive.conftest import Running, send, send_then_drop

pytestmark = pytest.mark.network

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATA_SET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
SOP_CLASS_NOT_SUPPORTED = 0x0122


def assert_nothing_kept(scp: Running) -> None:
    assert scp.instances() == []
    assert scp.jobs() == []
    assert scp.queued_job_ids() == []
    assert scp.stored_files() == []
    assert scp.temp_files() == []


def assert_still_serving(scp: Running, tmp_path: Path) -> None:
    assert send(scp.port, [cine("raw", frames=2)]) == [SUCCESS]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_garbage_after_file_meta_is_refused(scp: Running, tmp_path: Path, seed: int) -> None:
    """Random bytes where the data set should be: an error status (0xA900 or 0xCxxx), no crash."""
    ds = cine("raw")
    path = tmp_path / "garbage.dcm"
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(fh, ds.file_meta)
        fh.write(random.Random(seed).randbytes(5000))
    [status] = send(scp.port, [path])
    assert status is not None and (status == DATA_SET_MISMATCH or status & 0xF000 == CANNOT_UNDERSTAND)
    assert_nothing_kept(scp)
    assert_still_serving(scp, tmp_path)


def test_element_longer_than_the_object_is_cannot_understand(scp: Running, tmp_path: Path) -> None:
    """A trailing element that claims 1 MiB but carries 100 bytes (a cut-off send)."""
    path = save(cine("raw"), tmp_path / "overlong.dcm")
    with open(path, "ab") as fh:
        fh.write(b"\xfc\xff\xfc\xff" + b"OB\0\0" + (1 << 20).to_bytes(4, "little") + b"\0" * 100)
    assert send(scp.port, [path]) == [CANNOT_UNDERSTAND]
    assert_nothing_kept(scp)


def test_encapsulated_pixel_data_with_defined_length_is_cannot_understand(scp: Running) -> None:
    ds = cine("jpeg")
    ds["PixelData"].is_undefined_length = False  # illegal for a compressed transfer syntax
    assert send(scp.port, [ds]) == [CANNOT_UNDERSTAND]
    assert_nothing_kept(scp)


@pytest.mark.parametrize("syntax", ["raw", "jpeg"])
def test_truncated_data_set_is_refused(scp: Running, tmp_path: Path, syntax: str) -> None:
    """The object arrives complete as far as DIMSE knows, but its pixel data stops early."""
    path = save(cine(syntax, frames=6), tmp_path / "full.dcm")
    data = path.read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) - 3000])
    # Native: the pixel value runs past the end (0xC000). Encapsulated: pydicom loses the data set
    # structure without the sequence delimiter, so the UIDs go missing first (0xA900).
    expected = CANNOT_UNDERSTAND if syntax == "raw" else DATA_SET_MISMATCH
    assert send(scp.port, [cut]) == [expected]
    assert_nothing_kept(scp)
    assert_still_serving(scp, tmp_path)


def test_connection_dropped_mid_object_leaves_nothing(scp: Running, tmp_path: Path) -> None:
    path = save(cine("raw", frames=40, rows=120, cols=160), tmp_path / "big.dcm")
    send_then_drop(scp.port, path, fraction=0.5)
    deadline = time.monotonic() + 10
    while scp.temp_files() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert_nothing_kept(scp)
    assert_still_serving(scp, tmp_path)


@pytest.mark.parametrize(
    "missing", ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID"]
)
def test_missing_uid_is_data_set_mismatch(scp: Running, tmp_path: Path, missing: str) -> None:
    ds = cine("raw")
    delattr(ds, missing)
    path = tmp_path / "missing.dcm"
    save(ds, path, valid=False)
    assert send(scp.port, [path]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_invalid_uid_is_data_set_mismatch(scp: Running, tmp_path: Path) -> None:
    ds = cine("raw")
    ds.StudyInstanceUID = "1.2.3/../../etc"  # a hostile value: never becomes a path, and is refused
    path = tmp_path / "bad_uid.dcm"
    save(ds, path, valid=False)
    assert send(scp.port, [path]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_data_set_uids_must_match_the_request(scp: Running, tmp_path: Path) -> None:
    ds = cine("raw")
    # Re-label the file meta (which the SCU puts into the C-STORE request) only.
    other = cine("raw")
    other.PixelData = ds.PixelData
    other.file_meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.2.1143.999"
    other.SOPInstanceUID = ds.SOPInstanceUID
    bad = tmp_path / "mismatch.dcm"
    save(other, bad, valid=False)
    assert send(scp.port, [bad]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_zero_frames(scp: Running, tmp_path: Path) -> None:
    ds = cine("raw", frames=0)  # NumberOfFrames 0, empty pixel data
    assert send(scp.port, [ds]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_no_pixel_data(scp: Running) -> None:
    ds = cine("raw", frames=3)
    del ds.PixelData
    assert send(scp.port, [ds]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


@pytest.mark.parametrize("frames_claimed", [3, 5])
def test_native_frames_inconsistent_with_header(scp: Running, frames_claimed: int) -> None:
    ds = cine("raw", frames=4)  # four frames of data
    ds.NumberOfFrames = frames_claimed
    assert send(scp.port, [ds]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_native_partial_frame(scp: Running) -> None:
    ds = cine("raw", frames=4)
    ds.PixelData = ds.PixelData[: -(64 * 80 // 2)]  # last frame half missing
    assert send(scp.port, [ds]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def _jpeg(frame) -> bytes:  # type: ignore[no-untyped-def]
    buf = io.BytesIO()
    Image.fromarray(frame, "RGB").save(buf, "JPEG", quality=90, subsampling=1)
    return buf.getvalue()


def test_jpeg_frame_of_other_size(scp: Running) -> None:
    ds = cine("jpeg", frames=3)
    arr = frames_array(3, 64, 80, rgb=True)
    odd = frames_array(1, 48, 80, rgb=True)[0]
    ds.PixelData = encapsulate([_jpeg(arr[0]), _jpeg(odd), _jpeg(arr[2])])
    assert send(scp.port, [ds]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_jpeg_frame_count_differs(scp: Running) -> None:
    ds = cine("jpeg", frames=3)
    ds.NumberOfFrames = 4
    assert send(scp.port, [ds]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_rle_frame_with_wrong_segments(scp: Running) -> None:
    ds = cine("rle", frames=2)
    rgb = cine("rle", frames=2, rgb=True)  # three segments per frame, header says one sample
    ds.PixelData = rgb.PixelData
    assert send(scp.port, [ds]) == [DATA_SET_MISMATCH]
    assert_nothing_kept(scp)


def test_unsupported_sop_class_rejected_by_default(scp: Running, tmp_path: Path) -> None:
    """CT is not even negotiated by default: the SCU cannot send it (no accepted context)."""
    ds = cine("raw", frames=1, sop_class=CTImageStorage, modality="CT")
    with pytest.raises((ConnectionRefusedError, ValueError)):
        send(scp.port, [ds])
    assert_nothing_kept(scp)


def test_unsupported_sop_class_in_a_us_context_is_refused(scp: Running, tmp_path: Path) -> None:
    """A CT data set sent under a US presentation context: 0x0122 with the default 'reject'."""
    ds = cine("raw", frames=1, sop_class=CTImageStorage, modality="CT")
    ds.file_meta.MediaStorageSOPClassUID = UltrasoundMultiFrameImageStorage
    path = tmp_path / "ct_as_us.dcm"
    save(ds, path, valid=False)
    status = send(scp.port, [path])
    assert status in ([SOP_CLASS_NOT_SUPPORTED], [DATA_SET_MISMATCH])
    assert_nothing_kept(scp)


def test_unsupported_sop_class_stored_and_ignored_when_configured(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(LUSAI_UNSUPPORTED_SOP_CLASS="ignore")
    ds = cine("raw", frames=1, sop_class=CTImageStorage, modality="CT")
    assert send(scp.port, [ds]) == [SUCCESS]
    [inst] = scp.instances()
    assert inst.state == "ignored" and inst.sop_class_uid == CTImageStorage
    assert scp.jobs() == [] and scp.queued_job_ids() == []
    assert len(scp.stored_files()) == 1


def test_object_over_size_limit_is_out_of_resources(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(LUSAI_MAX_OBJECT_BYTES="20000")
    assert send(scp.port, [cine("raw", frames=10)]) == [OUT_OF_RESOURCES]  # ~51 kB
    assert_nothing_kept(scp)
    assert send(scp.port, [cine("raw", frames=2, rows=32, cols=32)]) == [SUCCESS]


def test_disk_full_while_receiving_is_out_of_resources(
    scp: Running, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC from the kernel half-way through an object (injected at the write call)."""
    real_write = os.write
    written = {"n": 0}

    def write(fd: int, data: bytes) -> int:
        written["n"] += len(data)
        if written["n"] > 30000:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(pynetdicom_adapter.os, "write", write)
    assert send(scp.port, [cine("raw", frames=10)]) == [OUT_OF_RESOURCES]
    assert_nothing_kept(scp)
    monkeypatch.setattr(pynetdicom_adapter.os, "write", real_write)
    assert_still_serving(scp, tmp_path)


@pytest.fixture
def tiny_fs(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A real 1 MiB tmpfs (needs root and mount permission; skipped elsewhere)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("cannot mount tmpfs here")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_full_filesystem_is_out_of_resources(scp_factory, tiny_fs: Path) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(LUSAI_STORAGE_ROOT=str(tiny_fs))
    assert send(scp.port, [cine("raw", frames=4, rows=256, cols=256)]) == [SUCCESS]  # 262 kB fits
    big = cine("raw", frames=30, rows=256, cols=256)  # 2 MB does not
    assert send(scp.port, [big]) == [OUT_OF_RESOURCES]
    assert len(scp.instances()) == 1 and len(scp.stored_files()) == 1
    assert scp.temp_files() == []  # the partial file was removed, the space is free again
    assert send(scp.port, [cine("raw", frames=4, rows=256, cols=256, seed=1)]) == [SUCCESS]
