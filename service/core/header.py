"""Header checks on an incoming object, without decoding pixel data.

Each failure names the DIMSE status the SCP answers with (PS3.4 Annex B.2.3 / PS3.7 C.4.2) and the
HTTP status the upload endpoint uses, and a reason free of patient data.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.tag import Tag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

from service.core.dicom import STATUS_CANNOT_UNDERSTAND, STATUS_DATA_SET_MISMATCH

UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = Tag(0x7FE00010)
#: Deflated Explicit VR Little Endian and Deflated Image Frame Compression (not in pydicom 3.0).
DEFLATED_SYNTAXES = frozenset({DeflatedExplicitVRLittleEndian, UID("1.2.840.10008.1.2.8.1")})


#: What parsing untrusted bytes can raise. Besides pydicom's own errors: a value whose length does
#: not fit its VR (``BytesLengthException``), an unknown VR (NotImplementedError, a RuntimeError),
#: a header cut short (``struct.error``), absurd numbers (ArithmeticError).
#: pydicom converts values lazily, so these surface wherever a header value is first read.
UNREADABLE = (
    InvalidDicomError,
    BytesLengthException,
    EOFError,
    ValueError,
    LookupError,
    TypeError,
    OSError,
    AttributeError,
    RuntimeError,
    ArithmeticError,
    struct.error,
)


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
    """Parse everything but the pixel values; large values are deferred, never loaded.

    Private tags are left alone (removing them walks, and so loads, every element).
    """
    try:
        ds = pydicom.dcmread(path, defer_size=4096, force=False)
        header = _header(ds)
        _check_lengths(ds, path, header.transfer_syntax_uid)
    except RejectedObject:
        raise
    except UNREADABLE as exc:
        raise RejectedObject(f"unreadable dataset ({type(exc).__name__})") from exc
    return header, ds


def _check_lengths(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    """A deferred (large) element whose value runs past the end of the file: a cut-off object.

    pydicom only seeks over deferred values, so it cannot notice this itself.
    """
    if transfer_syntax in DEFLATED_SYNTAXES:
        return  # inflated into memory by pydicom: offsets are not file offsets
    size = path.stat().st_size
    for raw in ds._dict.values():
        tell, length = getattr(raw, "value_tell", None), getattr(raw, "length", None)
        if tell is None or length is None or length == UNDEFINED_LENGTH:
            continue
        if int(tell) + int(length) > size:
            raise RejectedObject("data set truncated", STATUS_CANNOT_UNDERSTAND)


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
        transfer_syntax_uid=ts or ImplicitVRLittleEndian,
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


def check_image(header: Header, ds: Dataset, path: Path | None = None) -> None:
    """Reject ultrasound images we could never analyse (:func:`_check_image`); a value that cannot
    be parsed on the way is an unreadable data set (0xC000), never an unexpected error."""
    try:
        _check_image(header, ds, path)
    except RejectedObject:
        raise
    except UNREADABLE as exc:
        raise RejectedObject(f"unreadable dataset ({type(exc).__name__})") from exc


def _check_image(header: Header, ds: Dataset, path: Path | None = None) -> None:
    """Reject ultrasound images we could never analyse, reading only headers and frame markers.

    Zero frames, missing pixel data, a value that runs past the end of the file (truncated send),
    native pixel data whose length is not frames x rows x columns x samples, or compressed frames
    whose count or encoded size differs from the header: 0xA900 each. Nothing is decoded.
    """
    if header.frames < 1:
        raise RejectedObject("zero frames", STATUS_DATA_SET_MISMATCH)
    if not header.rows or not header.columns:
        raise RejectedObject("missing Rows/Columns", STATUS_DATA_SET_MISMATCH)
    if 0x7FE00010 not in ds:
        raise RejectedObject("no pixel data", STATUS_DATA_SET_MISMATCH)
    raw = ds._dict[PIXEL_DATA]  # the raw element: reading .value would load every frame
    # A deflated data set is inflated into memory by pydicom: offsets are not file offsets there.
    deflated = header.transfer_syntax_uid in DEFLATED_SYNTAXES
    size = path.stat().st_size if path is not None and not deflated else None
    value_tell = getattr(raw, "value_tell", None)
    raw_length = getattr(raw, "length", None)
    length = int(raw_length) if raw_length is not None else None
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    if UID(header.transfer_syntax_uid).is_encapsulated:
        if length != UNDEFINED_LENGTH:
            # PS3.5 A.4: encapsulated pixel data always has an undefined length.
            raise RejectedObject("encapsulated pixel data with a defined length", STATUS_CANNOT_UNDERSTAND)
        if size is not None and path is not None and value_tell is not None:
            check_fragments(path, int(value_tell), header, spp, bits)
        return
    if length is None or length == UNDEFINED_LENGTH:
        value = getattr(raw, "value", None)
        length = len(value) if value is not None else 0
    if size is not None and value_tell is not None and int(value_tell) + length > size:
        raise RejectedObject("pixel data truncated", STATUS_CANNOT_UNDERSTAND)
    expected = header.rows * header.columns * spp * header.frames * bits // 8
    if header.photometric and header.photometric.startswith("YBR") and header.photometric.endswith("422"):
        expected = expected * 2 // 3
    # PS3.5 8.1.1: odd lengths are padded to even, so one extra byte is legal.
    if length not in (expected, expected + 1, expected + (expected & 1)):
        raise RejectedObject(
            "pixel data length differs from frames x rows x columns x samples", STATUS_DATA_SET_MISMATCH
        )


_ITEM = b"\xfe\xff\x00\xe0"
_SEQ_DELIM = b"\xfe\xff\xdd\xe0"
_HEAD = 4096  # bytes of each fragment read to find the frame's SOF/SIZ/RLE header
# JPEG SOFn markers that carry the frame size (not DHT C4, JPG C8, DAC CC); F7 is JPEG-LS SOF55.
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7}


def _fragments(path: Path, value_tell: int) -> list[tuple[int, bytes]]:
    """(length, first bytes) of each item of encapsulated pixel data, offset table first."""
    out: list[tuple[int, bytes]] = []
    size = path.stat().st_size
    with open(path, "rb") as fh:
        fh.seek(value_tell)
        while True:
            tag = fh.read(8)
            if len(tag) < 8:
                raise RejectedObject("pixel data truncated", STATUS_CANNOT_UNDERSTAND)
            if tag[:4] == _SEQ_DELIM:
                return out
            if tag[:4] != _ITEM:
                raise RejectedObject("malformed encapsulated pixel data", STATUS_CANNOT_UNDERSTAND)
            n = int.from_bytes(tag[4:], "little")
            start = fh.tell()
            if n == UNDEFINED_LENGTH or start + n > size:
                raise RejectedObject("pixel data truncated", STATUS_CANNOT_UNDERSTAND)
            out.append((n, fh.read(min(n, _HEAD))))
            fh.seek(start + n)


def _jpeg_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SOFn segment of a JPEG / JPEG-LS frame."""
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        seg = int.from_bytes(head[i + 2 : i + 4], "big")
        if marker in _SOF:
            if i + 10 > len(head):
                return None
            return (
                int.from_bytes(head[i + 5 : i + 7], "big"),
                int.from_bytes(head[i + 7 : i + 9], "big"),
                head[i + 9],
            )
        i += 2 + seg
    return None


def _j2k_size(head: bytes) -> tuple[int, int, int] | None:
    """(rows, columns, components) from the SIZ segment that must follow a J2K codestream's SOC."""
    if len(head) < 42 or head[2:4] != b"\xff\x51":
        return None
    x, y = int.from_bytes(head[8:12], "big"), int.from_bytes(head[12:16], "big")
    x0, y0 = int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    return y - y0, x - x0, int.from_bytes(head[40:42], "big")


def check_fragments(path: Path, value_tell: int, header: Header, spp: int, bits: int) -> None:
    """Frame count and per-frame size of encapsulated pixel data, from the codestream headers."""
    items = _fragments(path, value_tell)
    if not items:
        raise RejectedObject("encapsulated pixel data has no offset table", STATUS_CANNOT_UNDERSTAND)
    bot_len, _ = items[0]
    fragments = items[1:]
    if not fragments:
        raise RejectedObject("no frames in pixel data", STATUS_DATA_SET_MISMATCH)
    ts = header.transfer_syntax_uid
    if ts == RLELossless:  # RLE: exactly one fragment per frame (PS3.5 A.4.2)
        starts = [h for _, h in fragments]
        sizer = None
    elif ts.startswith("1.2.840.10008.1.2.4.") and ts.rsplit(".", 1)[1] in {
        "50", "51", "57", "70", "80", "81",
    }:  # fmt: skip
        starts = [h for _, h in fragments if h[:2] == b"\xff\xd8"]
        sizer = _jpeg_size
    elif ts.rsplit(".", 1)[1] in {"90", "91", "92", "93", "201", "202", "203"}:
        starts = [h for _, h in fragments if h[:2] == b"\xff\x4f"]
        sizer = _j2k_size
    else:  # MPEG/HEVC video and private syntaxes: frames live inside one stream
        return
    n_frames = bot_len // 4 if bot_len else len(starts)
    if n_frames != header.frames or (sizer is not None and len(starts) != header.frames):
        raise RejectedObject(
            "number of compressed frames differs from NumberOfFrames", STATUS_DATA_SET_MISMATCH
        )
    want = (header.rows, header.columns)
    for head in starts:
        if sizer is None:
            segments = int.from_bytes(head[:4], "little") if len(head) >= 64 else 0
            if segments != spp * ((bits + 7) // 8):
                raise RejectedObject("RLE frame has the wrong number of segments", STATUS_DATA_SET_MISMATCH)
            continue
        found = sizer(head)
        if found is not None and ((found[0], found[1]) != want or found[2] != spp):
            raise RejectedObject(
                "a compressed frame's size differs from Rows/Columns", STATUS_DATA_SET_MISMATCH
            )
