"""Good objects in every transfer syntax, sent with pynetdicom and DCMTK storescu.

Each is checked end to end: Success, stored byte for byte as received (same transfer syntax and
pixel bytes), SHA-256 of the stored file recorded, Study/Series/Instance rows, one job per cine
and the matching Celery message in the embedded broker.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, UltrasoundImageStorage, generate_uid

from service.core.dicom import US_MULTIFRAME_RETIRED
from tests.conftest import SHARED, which
from tests.factories import cine, save
from tests.service.receive.conftest import Running, echo, send, storescu

pytestmark = pytest.mark.network

SUCCESS = 0x0000


def check_stored(scp: Running, sent: list[Path]) -> None:
    """Every sent file is stored with its data set unchanged and has rows, a job and a message."""
    instances = {i.sop_instance_uid: i for i in scp.instances()}
    jobs = scp.jobs()
    assert len(instances) == len(sent)
    assert sorted(j.instance_id for j in jobs) == sorted(i.id for i in instances.values())
    assert scp.queued_job_ids() == sorted(j.id for j in jobs)
    assert all(j.state == "queued" and j.enqueued_at is not None for j in jobs)  # sent, and recorded as sent
    for path in sent:
        original = pydicom.dcmread(path)
        inst = instances[original.SOPInstanceUID]
        stored = scp.store.path(inst.storage_key)
        data = stored.read_bytes()
        assert hashlib.sha256(data).hexdigest() == inst.sha256 == stored.stem
        assert inst.size_bytes == len(data)
        assert inst.state == "accepted"
        assert inst.transfer_syntax_uid == original.file_meta.TransferSyntaxUID
        copy = pydicom.dcmread(stored)
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.PixelData == original.PixelData  # compressed frames untouched, never decoded
        assert inst.frames == int(original.get("NumberOfFrames", 1))
    assert scp.temp_files() == []


def test_echo(scp: Running) -> None:
    assert echo(scp.port) == SUCCESS


def test_fifty_associations_held_open_at_once_are_all_accepted(scp: Running) -> None:
    """Regression (bench/chaos/load.py, 50 senders holding their associations open between
    objects): the default limit of 32 per SCP process refused 790 of 859 valid cines."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assocs = [ae.associate("127.0.0.1", scp.port, ae_title="LUSAI") for _ in range(50)]
    try:
        assert sum(a.is_established for a in assocs) == 50  # all open at the same time
        assert all(a.send_c_echo().Status == SUCCESS for a in assocs)
    finally:
        for a in assocs:
            if a.is_established:
                a.release()


@pytest.mark.parametrize(
    ("syntax", "rgb"),
    [
        ("raw", False),
        ("raw", True),
        ("jpeg", True),
        ("rle", False),
        ("rle", True),
        ("j2k", False),
        ("deflate", False),
    ],
)
def test_pynetdicom_sends_each_syntax(scp: Running, tmp_path: Path, syntax: str, rgb: bool) -> None:
    paths = [save(cine(syntax, frames=5, rgb=rgb, seed=i), tmp_path / f"{i}.dcm") for i in range(2)]
    assert send(scp.port, list(paths)) == [SUCCESS, SUCCESS]
    check_stored(scp, paths)


def test_implicit_and_single_frame(scp: Running, tmp_path: Path) -> None:
    ds = cine("raw", frames=3)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    still = cine("raw", frames=1, sop_class=UltrasoundImageStorage)
    paths = [save(ds, tmp_path / "implicit.dcm"), save(still, tmp_path / "still.dcm")]
    assert send(scp.port, paths) == [SUCCESS, SUCCESS]
    check_stored(scp, paths)


def test_retired_us_multiframe_class(scp: Running, tmp_path: Path) -> None:
    ds = cine("raw", frames=3, sop_class=US_MULTIFRAME_RETIRED)
    path = save(ds, tmp_path / "retired.dcm")
    assert send(scp.port, [path]) == [SUCCESS]
    check_stored(scp, [path])


def _dcmtk_convert(tool: str, args: list[str], src: Path, dst: Path) -> Path:
    exe = which(tool)
    subprocess.run([exe, *args, str(src), str(dst)], check=True, capture_output=True, timeout=60)
    return dst


STORESCU_CASES = {
    # name: (how to make it, storescu proposal option)
    "explicit-le": (None, "-xe"),
    "big-endian": (("dcmconv", ["+tb"]), "-xb"),
    "jpeg-baseline-ybr422": ("jpeg", "-xy"),
    "rle": ("rle", "-xr"),
    "j2k-lossless": ("j2k", "-xv"),
    "jpeg-ls-lossless": (("dcmcjpls", ["+el"]), "-xt"),
    "jpeg-lossless-sv1": (("dcmcjpeg", ["+e1"]), "-xs"),
    "deflated": (("dcmconv", ["+td"]), "-xd"),
}


@pytest.mark.parametrize("case", list(STORESCU_CASES))
def test_storescu_sends(scp: Running, tmp_path: Path, case: str) -> None:
    make, option = STORESCU_CASES[case]
    if isinstance(make, str):
        path = save(cine(make, frames=4, rgb=make == "jpeg"), tmp_path / f"{case}.dcm")
    else:
        raw = save(cine("raw", frames=4), tmp_path / "raw.dcm")
        path = raw if make is None else _dcmtk_convert(make[0], make[1], raw, tmp_path / f"{case}.dcm")
    out = storescu(scp.port, path, extra=(option,))
    assert "Received Store Response (Success)" in out, out
    check_stored(scp, [path])


def test_storescu_many_files_one_association(scp: Running, tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    paths = [
        save(cine("raw", frames=3, seed=i, study_uid=study, series_uid=series), tmp_path / f"{i}.dcm")
        for i in range(6)
    ]
    out = storescu(scp.port, *paths)
    assert out.count("Received Store Response (Success)") == 6, out
    check_stored(scp, paths)
    # one study and one series row for six cines
    with_series = {i.series_id for i in scp.instances()}
    assert len(with_series) == 1


@pytest.fixture(scope="module")
def blus_cines(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real lung-ultrasound cines made by the shared blus_to_dicom.py (skipped without ../shared)."""
    tool = SHARED / "tools" / "blus_to_dicom.py"
    data = SHARED / "datasets" / "blus-dev"
    if not tool.is_file() or not data.is_dir():
        pytest.skip("../shared with blus-dev is not present")
    out = tmp_path_factory.mktemp("blus")
    subprocess.run(
        [sys.executable, str(tool), str(data), str(out), "--patients", "even", "--max", "2"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        pytest.fail("blus_to_dicom.py made no files")
    return files


def test_real_blus_cines_with_storescu_and_pynetdicom(scp: Running, blus_cines: list[Path]) -> None:
    first, rest = blus_cines[:1], blus_cines[1:]
    ts = str(pydicom.dcmread(first[0], stop_before_pixels=True).file_meta.TransferSyntaxUID)
    option = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2.5": "-xr"}.get(ts, "-xe")
    out = storescu(scp.port, *first, extra=(option,))
    assert "Received Store Response (Success)" in out, out
    if rest:
        assert send(scp.port, rest) == [SUCCESS] * len(rest)
    check_stored(scp, blus_cines)


def test_large_cine_streams_and_hashes_correctly(scp: Running, tmp_path: Path) -> None:
    """Several MB in 128 KiB fragments: the threaded SHA-256 must equal a hash of the stored file."""
    path = save(cine("raw", frames=30, rows=256, cols=256, rgb=True), tmp_path / "large.dcm")
    assert send(scp.port, [path]) == [SUCCESS]
    check_stored(scp, [path])
