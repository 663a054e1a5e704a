"""Header checks on an incoming object, without decoding pixel data.

Each failure names the DIMSE status the SCP answers with (PS3.4 Annex B.2.3 / PS3.7 C.4.2) and the
HTTP status the upload endpoint uses, and a reason free of patient data.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_MULTIFRAME_RETIRED = "1.2.840.10008.5.1.4.1.1.3"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_IMAGE_RETIRED = "1.2.840.10008.5.1.4.1.1.6"
US_SOP_CLASSES = frozenset({US_MULTIFRAME, US_MULTIFRAME_RETIRED, US_IMAGE, US_IMAGE_RETIRED})

# DIMSE C-STORE failure statuses used below.
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (storage full)
STATUS_DATA_SET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
STATUS_PROCESSING_FAILURE = 0x0110  # Failure: Processing failure


class RejectedObject(Exception):
    """An object we will not keep; carries the DIMSE status and HTTP status to answer with."""

    def __init__(self, reason: str, dimse_status: int = STATUS_CANNOT_UNDERSTAND, http_status: int = 422):
        super().__init__(reason)
        self.reason = reason
        self.dimse_status = dimse_status
        self.http_status = http_status


@dataclass(frozen=True)
class Header:
    """The non-pixel facts we index; PHI fields only those the API must show."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    frames: int
    rows: int | None
    columns: int | None
    photometric: str | None
    body_part: str | None
    study_description: str | None
    series_description: str | None
    series_number: int | None
    patient_id: str | None
    accession_number: str | None
    study_date: str | None


def _str(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


def _uid(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if not value:
        raise RejectedObject(f"missing {keyword}", STATUS_DATA_SET_MISMATCH)
    uid = UID(str(value))
    if len(uid) > 64 or not uid.is_valid:
        raise RejectedObject(f"invalid {keyword}", STATUS_DATA_SET_MISMATCH)
    return str(uid)


def read_header(path: Path) -> tuple[Header, Dataset]:
    """Parse everything but the pixel values; large values are deferred, not loaded."""
    try:
        ds = pydicom.dcmread(path, defer_size=4096, force=False)
        ds.remove_private_tags()  # not needed for indexing; avoids parsing surprises below
        header = _header(ds)
    except RejectedObject:
        raise
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, AttributeError) as exc:
        raise RejectedObject(f"unreadable dataset ({type(exc).__name__})") from exc
    return header, ds


def _header(ds: Dataset) -> Header:
    meta = getattr(ds, "file_meta", None)
    ts = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
    sop_class = _uid(ds, "SOPClassUID")
    frames_raw = ds.get("NumberOfFrames", 1)
    try:
        frames = int(frames_raw) if frames_raw not in (None, "") else 1
    except (TypeError, ValueError) as exc:
        raise RejectedObject("invalid NumberOfFrames", STATUS_DATA_SET_MISMATCH) from exc
    rows = ds.get("Rows")
    cols = ds.get("Columns")
    try:
        series_number = int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None
    except (TypeError, ValueError):
        series_number = None
    return Header(
        sop_class_uid=sop_class,
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=ts or "1.2.840.10008.1.2",
        modality=_str(ds, "Modality", 16),
        frames=frames,
        rows=int(rows) if rows else None,
        columns=int(cols) if cols else None,
        photometric=_str(ds, "PhotometricInterpretation", 16),
        body_part=_str(ds, "BodyPartExamined", 16),
        study_description=_str(ds, "StudyDescription"),
        series_description=_str(ds, "SeriesDescription"),
        series_number=series_number,
        patient_id=_str(ds, "PatientID"),
        accession_number=_str(ds, "AccessionNumber"),
        study_date=_str(ds, "StudyDate", 8),
    )


def check_image(header: Header, ds: Dataset) -> None:
    """Reject ultrasound images we could never analyse: no pixels, zero frames, inconsistent sizes."""
    if header.frames < 1:
        raise RejectedObject("zero frames", STATUS_DATA_SET_MISMATCH)
    if not header.rows or not header.columns:
        raise RejectedObject("missing Rows/Columns", STATUS_DATA_SET_MISMATCH)
    if "PixelData" not in ds:
        raise RejectedObject("no pixel data", STATUS_DATA_SET_MISMATCH)
    elem = ds.data_element("PixelData")
    assert elem is not None
    if UID(header.transfer_syntax_uid).is_compressed:
        return  # fragments are checked by the decoder in the worker; the SCP never decodes
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    expected = header.rows * header.columns * spp * header.frames * bits // 8
    length = elem.length if elem.value is None else len(elem.value)
    if header.photometric and header.photometric.startswith("YBR") and header.photometric.endswith("422"):
        expected = expected * 2 // 3
    if length < expected:
        raise RejectedObject("pixel data shorter than frames x rows x columns", STATUS_DATA_SET_MISMATCH)
