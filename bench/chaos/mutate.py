"""Structure-aware DICOM mutants for the fuzz campaign (``bench/chaos/fuzz.py``).

Seeds are small valid cines from ``tests.factories`` (JPEG Baseline YBR_FULL_422 and raw
MONOCHROME2, 4-8 frames of 64x80) carrying PHI markers, so a log scan can prove none of them
reaches a log line. Each mutant is deterministic from ``(seed, index)`` and labelled with its
kind; its family groups kinds for the report.

Mutations are made where pydicom would still write the object (UIDs, SOP class, frame counts,
photometric and bit depth) and otherwise on the written bytes: the valid file is written first,
its explicit VR little endian data set is walked here (top-level elements, sequences and
encapsulated fragments), and lengths, VRs, item tags, offset tables and JPEG scan data are patched
in place. Non-DICOM kinds are whole files of other bytes.

``Mutant.data`` is what goes over REST; ``Mutant.wire()`` is what a C-STORE carries: the same file
when its file meta is readable, else the bytes behind a valid meta header (a DIMSE data set has
no preamble or meta, so a non-DICOM body is sent as the data set itself).
"""

from __future__ import annotations

import copy
import io
import struct
import sys
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from tests.factories import cine  # noqa: E402

PHI_NAME = "CHAOS^PHI^MARKER"
PHI_ID_PREFIX = "PHI-"
PHI_ACC_PREFIX = "PHIACC"
#: Strings that must never appear in a log line.
PHI_MARKERS = (PHI_NAME, "CHAOS^PHI", PHI_ID_PREFIX, PHI_ACC_PREFIX)
#: SOP classes a fuzzing association proposes (the wrong ones included, so they reach the handler).
SOP_CLASSES = (
    UltrasoundMultiFrameImageStorage,
    UltrasoundImageStorage,
    CTImageStorage,
    SecondaryCaptureImageStorage,
)
SYNTAXES = (JPEGBaseline8Bit, ExplicitVRLittleEndian, ImplicitVRLittleEndian)

LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
UNDEFINED = 0xFFFFFFFF
ITEM, ITEM_DELIM, SEQ_DELIM = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
PNG_BYTES = (
    b"\x89PNG\r\n\x1a\n"
    + struct.pack(">I", 13)
    + b"IHDR"
    + struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    + struct.pack(">I", zlib.crc32(b"IHDR" + struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)))
    + struct.pack(">I", 10)
    + b"IDAT"
    + zlib.compress(b"\x00\x00")[:10].ljust(10, b"\x00")
    + b"\x00\x00\x00\x00"
    + b"\x00\x00\x00\x00IEND\xaeB`\x82"
)


@dataclass
class Mutant:
    index: int
    kind: str
    family: str
    syntax: str  # seed: "jpeg" or "raw" ("none" for non-DICOM bytes)
    data: bytes
    sop_instance_uid: str
    sop_class_uid: str = UltrasoundMultiFrameImageStorage
    transfer_syntax: str = ExplicitVRLittleEndian
    #: Header-valid, pixel data corrupt: must be accepted and its job must end with an error or a result.
    pixel_only: bool = False
    #: SOP Instance, Study and Series Instance UIDs of the seed (none may reach a log line).
    uids: tuple[str, ...] = ()
    notes: dict[str, object] = field(default_factory=dict)

    def wire(self) -> bytes:
        """Bytes for ``send_c_store(path)``: a Part 10 file whose meta pynetdicom can read."""
        if self.data[128:132] == b"DICM" and _meta_end(self.data) is not None:
            return self.data
        return _meta_bytes(self.sop_class_uid, self.sop_instance_uid, self.transfer_syntax) + self.data


# --- a small explicit VR little endian walker -----------------------------------------------------


@dataclass
class Elem:
    tag: int
    vr: bytes
    start: int  # offset of the tag
    len_off: int  # offset of the length field
    len_size: int  # 2 or 4
    value: int  # offset of the value
    length: int  # as encoded (may be UNDEFINED)
    end: int  # offset after the element (after the delimiter for undefined lengths)


def _tag(buf: bytes, pos: int) -> int:
    g, e = struct.unpack_from("<HH", buf, pos)
    return (g << 16) | e


def walk(buf: bytes, pos: int = 0, end: int | None = None) -> list[Elem]:
    """Top-level elements of an explicit VR little endian data set (stops at an item delimiter)."""
    end = len(buf) if end is None else end
    out: list[Elem] = []
    while pos + 8 <= end:
        tag = _tag(buf, pos)
        if tag >> 16 == 0xFFFE:
            break
        vr = bytes(buf[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            length = struct.unpack_from("<I", buf, pos + 8)[0]
            len_off, len_size, value = pos + 8, 4, pos + 12
        else:
            length = struct.unpack_from("<H", buf, pos + 6)[0]
            len_off, len_size, value = pos + 6, 2, pos + 8
        stop = _skip_items(buf, value, end) if length == UNDEFINED else value + length
        out.append(Elem(tag, vr, pos, len_off, len_size, value, length, stop))
        pos = stop
    return out


def _skip_items(buf: bytes, pos: int, end: int) -> int:
    """Past the sequence delimiter of an undefined-length SQ or encapsulated value."""
    while pos + 8 <= end:
        tag, length = _tag(buf, pos), struct.unpack_from("<I", buf, pos + 4)[0]
        if tag == SEQ_DELIM:
            return pos + 8
        if length == UNDEFINED:
            inner = walk(buf, pos + 8, end)
            pos = inner[-1].end if inner else pos + 8
            if pos + 8 <= end and _tag(buf, pos) == ITEM_DELIM:
                pos += 8
        else:
            pos += 8 + length
    return end


def fragments(buf: bytes, pix: Elem) -> list[tuple[int, int]]:
    """(offset of the item tag, value length) of each encapsulated item, offset table first."""
    out, pos = [], pix.value
    while pos + 8 <= len(buf):
        tag, length = _tag(buf, pos), struct.unpack_from("<I", buf, pos + 4)[0]
        if tag != ITEM:
            break
        out.append((pos, length))
        pos += 8 + length
    return out


def _meta_end(data: bytes) -> int | None:
    if len(data) < 144 or data[128:132] != b"DICM" or data[132:136] != b"\x02\x00\x00\x00":
        return None
    return 144 + struct.unpack_from("<I", data, 140)[0]


def _meta_bytes(sop_class: str, sop_uid: str, ts: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
    buf = io.BytesIO()
    buf.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)  # type: ignore[arg-type]
    return buf.getvalue()


# --- seeds ---------------------------------------------------------------------------------------


@cache
def _base(syntax: str, frames: int) -> Dataset:
    return cine(syntax, frames=frames, rows=64, cols=80)  # type: ignore[arg-type]


def seed_dataset(seed: int, index: int, syntax: str, frames: int) -> Dataset:
    ds = copy.deepcopy(_base(syntax, frames))  # a shallow copy shares the elements

    def uid(what: str) -> str:
        return str(generate_uid(entropy_srcs=[str(seed), str(index), what]))

    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid("sop")
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = uid("series")
    ds.PatientName = PHI_NAME
    ds.PatientID = f"{PHI_ID_PREFIX}{seed}-{index}"
    ds.AccessionNumber = f"{PHI_ACC_PREFIX}{index}"
    ds.PatientBirthDate = "19500101"
    return ds


# --- mutators ------------------------------------------------------------------------------------

Rng = np.random.Generator
DsMut = Callable[[Rng, Dataset], None]
ByteMut = Callable[[Rng, bytearray, str], bytearray]


def _pick(rng: Rng, seq: list | tuple):  # type: ignore[no-untyped-def]
    return seq[int(rng.integers(len(seq)))]


def _set(keyword: str, values: list[object]) -> DsMut:
    def mut(rng: Rng, ds: Dataset) -> None:
        setattr(ds, keyword, _pick(rng, values))

    return mut


def _delete(*keywords: str) -> DsMut:
    def mut(rng: Rng, ds: Dataset) -> None:
        kw = _pick(rng, keywords)
        if kw in ds:
            delattr(ds, kw)

    return mut


def _frames_lie(rng: Rng, ds: Dataset) -> None:
    n = int(ds.NumberOfFrames)
    ds.NumberOfFrames = max(1, n + int(_pick(rng, [-3, -2, -1, 1, 2, 5, 100])))


def _bit_depth(rng: Rng, ds: Dataset) -> None:
    choice = int(rng.integers(5))
    if choice == 0:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    elif choice == 1:
        ds.BitsStored, ds.HighBit = 12, 11
    elif choice == 2:
        ds.BitsAllocated = 1
    elif choice == 3:
        ds.BitsStored, ds.HighBit = 16, 15  # stored > allocated
    else:
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31


def _photometric(rng: Rng, ds: Dataset) -> None:
    choice = int(rng.integers(5))
    if choice == 0:
        ds.PhotometricInterpretation = _pick(rng, ["RGB", "YBR_FULL", "PALETTE COLOR", "MONOCHROME1", "XYZ"])
    elif choice == 1:
        ds.SamplesPerPixel = 3 if ds.SamplesPerPixel == 1 else 1
    elif choice == 2:
        ds.PhotometricInterpretation = "YBR_FULL_422" if ds.SamplesPerPixel == 1 else "MONOCHROME2"
    elif choice == 3:
        ds.PixelRepresentation = 1
        ds.PlanarConfiguration = 1
    else:
        ds.SamplesPerPixel = 4
        ds.PhotometricInterpretation = "ARGB"


def _invalid_uid(rng: Rng, ds: Dataset) -> None:
    kw = _pick(rng, ["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
    setattr(ds, kw, _pick(rng, ["1.2.abc", "1." * 40 + "1", "", "01.2.3", "1..2"]))


def _wrong_sop(rng: Rng, ds: Dataset) -> None:
    uid = _pick(rng, [CTImageStorage, SecondaryCaptureImageStorage, "1.2.3.4.5.6", UltrasoundImageStorage])
    ds.SOPClassUID = uid
    if rng.integers(2):
        ds.file_meta.MediaStorageSOPClassUID = uid  # else: meta and data set disagree


def _modality(rng: Rng, ds: Dataset) -> None:
    ds.Modality = _pick(rng, ["CT", "", "XX", "SEG"])


def _huge_private(size: int) -> DsMut:
    def mut(rng: Rng, ds: Dataset) -> None:
        ds.add_new(0x00090010, "LO", "CHAOS FUZZ")
        ds.add_new(0x00091001, "OB", bytes(rng.integers(0, 256, 4096, np.uint8)) * (size // 4096))

    return mut


def _huge_text(rng: Rng, ds: Dataset) -> None:
    ds.add_new(0x00091010, "UT", "x" * int(rng.integers(70_000, 2_000_000)))
    ds.add_new(0x00090010, "LO", "CHAOS FUZZ")


# byte-level


def _elems(buf: bytearray, syntax: str) -> tuple[int, list[Elem]]:
    start = _meta_end(bytes(buf)) or 0
    return start, walk(bytes(buf), start)


def _truncate(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    start, _ = _elems(buf, syntax)
    return buf[: int(rng.integers(start, len(buf)))]


def _truncate_header(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    start, elems = _elems(buf, syntax)
    pix = next(e for e in elems if e.tag == PIXEL_DATA)
    return buf[: int(rng.integers(start + 1, pix.start + 4))]


def _length(mode: str) -> ByteMut:
    def mut(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
        _, elems = _elems(buf, syntax)
        cand = [e for e in elems if e.length != UNDEFINED and e.tag != PIXEL_DATA] or elems
        e = _pick(rng, cand)
        limit = 0xFFFF if e.len_size == 2 else 0xFFFFFFFE
        if mode == "oversized":
            new = min(limit, e.length + int(_pick(rng, [1, 2, 7, 100, 4096, limit])))
        elif mode == "undersized":
            new = max(0, e.length - int(rng.integers(1, max(2, e.length + 1))))
        else:  # odd
            new = e.length + 1 if e.length % 2 == 0 else e.length
        fmt = "<H" if e.len_size == 2 else "<I"
        struct.pack_into(fmt, buf, e.len_off, min(new, limit))
        return buf

    return mut


def _pixel_length(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    _, elems = _elems(buf, syntax)
    pix = next(e for e in elems if e.tag == PIXEL_DATA)
    new = _pick(rng, [0, 2, pix.length - 2 if pix.length != UNDEFINED else 10, 0x7FFFFFFE, UNDEFINED - 1])
    struct.pack_into("<I", buf, pix.len_off, int(new) & 0xFFFFFFFF)
    return buf


def _wrong_vr(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    _, elems = _elems(buf, syntax)
    e = _pick(rng, elems)
    vr = _pick(rng, [b"SQ", b"OB", b"UN", b"US", b"UI", b"DS", b"\x00\x00", b"zz", b"UT", b"FD"])
    buf[e.start + 4 : e.start + 6] = vr
    return buf


def _sequence(mode: str) -> ByteMut:
    def mut(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
        _, elems = _elems(buf, syntax)
        sq = next((e for e in elems if e.vr == b"SQ"), None)
        if sq is None:
            return _wrong_vr(rng, buf, syntax)
        if mode == "undefined-no-delimiter":
            struct.pack_into("<I", buf, sq.len_off, UNDEFINED)
            if sq.length != UNDEFINED:  # items keep their lengths; no delimiters follow
                return buf
            return buf[: sq.end - 8] + buf[sq.end :]
        if mode == "wrong-item-tag":
            pos = sq.value
            if pos + 4 <= len(buf):
                buf[pos : pos + 4] = _pick(
                    rng, [b"\xfe\xff\xdd\xe0", b"\xfe\xff\x0d\xe0", b"\x08\x00\x16\x00", b"\xff\xff\xff\xff"]
                )
            return buf
        # item-length-lie
        pos = sq.value
        if pos + 8 <= len(buf):
            struct.pack_into("<I", buf, pos + 4, int(_pick(rng, [UNDEFINED, 0, 3, 1 << 30])))
        return buf

    return mut


def _encapsulation(mode: str) -> ByteMut:
    def mut(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
        _, elems = _elems(buf, syntax)
        pix = next(e for e in elems if e.tag == PIXEL_DATA)
        frags = fragments(bytes(buf), pix)
        if pix.length != UNDEFINED or len(frags) < 2:
            return _pixel_length(rng, buf, syntax)
        bot_pos, bot_len = frags[0]
        n = len(frags) - 1
        if mode == "bot-lies":
            offsets = [int(x) for x in rng.integers(0, 1 << 20, n)]
            table = struct.pack(f"<{n}I", *offsets)
            return buf[:bot_pos] + _item(table) + buf[bot_pos + 8 + bot_len :]
        if mode == "bot-short":
            return buf[:bot_pos] + _item(struct.pack("<I", 0) + b"\x01\x00") + buf[bot_pos + 8 + bot_len :]
        if mode == "no-seq-delimiter":
            end = pix.end
            return buf[: end - 8] + buf[end:]
        if mode == "odd-fragment":
            pos, length = _pick(rng, frags[1:])
            struct.pack_into("<I", buf, pos + 4, length + 1)
            return buf[: pos + 8 + length] + b"\x00" + buf[pos + 8 + length :]
        if mode == "fragment-length-lie":
            pos, length = _pick(rng, frags[1:])
            struct.pack_into(
                "<I", buf, pos + 4, int(_pick(rng, [length + 2, length - 2, 0, UNDEFINED, 1 << 31]))
            )
            return buf
        if mode == "missing-fragment":
            pos, length = _pick(rng, frags[1:])
            return buf[:pos] + buf[pos + 8 + length :]
        if mode == "extra-fragment":
            pos, length = frags[-1]
            copy = bytes(buf[pos : pos + 8 + length])
            return buf[: pos + 8 + length] + copy + buf[pos + 8 + length :]
        if mode == "split-fragment":  # one frame in two fragments (legal, rarely seen)
            pos, length = _pick(rng, frags[1:])
            half = (length // 2) & ~1
            value = bytes(buf[pos + 8 : pos + 8 + length])
            return buf[:pos] + _item(value[:half]) + _item(value[half:]) + buf[pos + 8 + length :]
        if mode == "wrong-item-tag":
            pos, _ = _pick(rng, frags)
            buf[pos : pos + 4] = _pick(rng, [b"\xfe\xff\xdd\xe0", b"\xe0\x7f\x10\x00", b"\x00\x00\x00\x00"])
            return buf
        raise ValueError(mode)

    return mut


def _item(value: bytes) -> bytes:
    return struct.pack("<II", ITEM, len(value)) + value


def _scan_span(value: bytes) -> tuple[int, int] | None:
    """(start, end) of the entropy-coded data after the first SOS, before EOI."""
    sos = value.find(b"\xff\xda")
    if sos < 0 or sos + 4 > len(value):
        return None
    start = sos + 2 + int.from_bytes(value[sos + 2 : sos + 4], "big")
    end = value.rfind(b"\xff\xd9")
    end = end if end > start else len(value)
    return (start, end) if end - start > 8 else None


def _jpeg(mode: str) -> ByteMut:
    """Corrupt the codestream of one or more frames, keeping SOI/SOF (the SCP's checks pass)."""

    def mut(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
        _, elems = _elems(buf, syntax)
        pix = next(e for e in elems if e.tag == PIXEL_DATA)
        frags = fragments(bytes(buf), pix)[1:]
        if not frags:
            return buf
        chosen = frags if mode in ("zero-scan", "garbage-scan") and rng.integers(2) else [_pick(rng, frags)]
        for pos, length in chosen:
            vstart = pos + 8
            value = bytes(buf[vstart : vstart + length])
            span = _scan_span(value)
            if span is None:
                continue
            s, e = span
            if mode == "flip-scan":
                for _ in range(int(rng.integers(1, 40))):
                    i = vstart + int(rng.integers(s, e))
                    buf[i] ^= 1 << int(rng.integers(8))
            elif mode == "zero-scan":
                cut = int(rng.integers(s, e))
                buf[vstart + cut : vstart + e] = b"\x00" * (e - cut)
            elif mode == "garbage-scan":
                buf[vstart + s : vstart + e] = bytes(rng.integers(0, 256, e - s, np.uint8))
            elif mode == "cut-eoi":  # EOI gone, length kept (padding zeros)
                eoi = value.rfind(b"\xff\xd9")
                if eoi > 0:
                    buf[vstart + eoi : vstart + eoi + 2] = b"\x00\x00"
            elif mode == "markers-in-scan":
                i = vstart + int(rng.integers(s, e - 2))
                buf[i : i + 2] = _pick(rng, [b"\xff\xd9", b"\xff\xd8", b"\xff\xc4", b"\xff\xda", b"\xff\xd0"])
            elif mode == "huffman":
                dht = value.find(b"\xff\xc4")
                if dht > 0:
                    for _ in range(8):
                        i = vstart + dht + 5 + int(rng.integers(0, 28))
                        buf[i] = int(rng.integers(256))
        return buf

    return mut


def _raw_pixels(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    _, elems = _elems(buf, syntax)
    pix = next(e for e in elems if e.tag == PIXEL_DATA)
    if pix.length == UNDEFINED:
        return _jpeg("garbage-scan")(rng, buf, syntax)
    buf[pix.value : pix.value + pix.length] = bytes(rng.integers(0, 256, pix.length, np.uint8))
    return buf


def _flip_header(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    start, elems = _elems(buf, syntax)
    pix = next(e for e in elems if e.tag == PIXEL_DATA)
    for _ in range(int(rng.integers(1, 16))):
        i = int(rng.integers(start, pix.start))
        buf[i] = int(rng.integers(256))
    return buf


def _duplicate_element(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    _, elems = _elems(buf, syntax)
    a, b = _pick(rng, elems[:-1]), _pick(rng, elems[:-1])
    if a.start > b.start:
        a, b = b, a
    chunk = bytes(buf[b.start : b.end])
    return buf[: a.start] + chunk + buf[a.start :]  # out of order, and twice


def _raw_value(tag: int, values: list[bytes]) -> ByteMut:
    """Replace the value of a short-VR element by bytes pydicom would refuse to write."""

    def mut(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
        _, elems = _elems(buf, syntax)
        e = next((e for e in elems if e.tag == tag), None)
        if e is None or e.len_size != 2:
            return buf
        value = _pick(rng, values)
        return buf[: e.len_off] + struct.pack("<H", len(value)) + value + buf[e.end :]

    return mut


def _ts_mismatch(rng: Rng, buf: bytearray, syntax: str) -> bytearray:
    """Meta says another transfer syntax than the data set's encoding (set below, in ``make``)."""
    return buf


# --- the table -----------------------------------------------------------------------------------

Spec = tuple[
    str, float, str, "DsMut | None", "ByteMut | None", bool
]  # family, weight, seeds, ..., pixel_only


def _spec(
    family: str,
    weight: float,
    seeds: str = "any",
    ds: DsMut | None = None,
    by: ByteMut | None = None,
    pixel_only: bool = False,
) -> Spec:
    return (family, weight, seeds, ds, by, pixel_only)


HUGE = 24 << 20
KINDS: dict[str, Spec] = {
    "valid": _spec("control", 4),
    "truncated": _spec("truncated", 4, by=_truncate),
    "truncated-header": _spec("truncated", 2, by=_truncate_header),
    "length-oversized": _spec("length", 4, by=_length("oversized")),
    "length-undersized": _spec("length", 4, by=_length("undersized")),
    "length-odd": _spec("length", 2, by=_length("odd")),
    "pixel-length-lie": _spec("length", 3, by=_pixel_length),
    "wrong-vr": _spec("vr", 5, by=_wrong_vr),
    "seq-undefined-no-delimiter": _spec("sequence", 2, by=_sequence("undefined-no-delimiter")),
    "seq-wrong-item-tag": _spec("sequence", 2, by=_sequence("wrong-item-tag")),
    "seq-item-length-lie": _spec("sequence", 2, by=_sequence("item-length-lie")),
    "encaps-bot-lies": _spec("encapsulation", 2, "jpeg", by=_encapsulation("bot-lies")),
    "encaps-bot-short": _spec("encapsulation", 1, "jpeg", by=_encapsulation("bot-short")),
    "encaps-no-seq-delimiter": _spec("encapsulation", 2, "jpeg", by=_encapsulation("no-seq-delimiter")),
    "encaps-odd-fragment": _spec("encapsulation", 2, "jpeg", by=_encapsulation("odd-fragment")),
    "encaps-fragment-length-lie": _spec("encapsulation", 2, "jpeg", by=_encapsulation("fragment-length-lie")),
    "encaps-missing-fragment": _spec("encapsulation", 2, "jpeg", by=_encapsulation("missing-fragment")),
    "encaps-extra-fragment": _spec("encapsulation", 1, "jpeg", by=_encapsulation("extra-fragment")),
    "encaps-split-fragment": _spec("encapsulation", 1, "jpeg", by=_encapsulation("split-fragment")),
    "encaps-wrong-item-tag": _spec("encapsulation", 1, "jpeg", by=_encapsulation("wrong-item-tag")),
    "frames-lie": _spec("frames", 4, ds=_frames_lie),
    "frames-absurd": _spec("absurd", 3, ds=_set("NumberOfFrames", [0, 65535, 2**31, -1, 2**40])),
    "frames-text": _spec(
        "absurd", 1, by=_raw_value(0x00280008, [b"ab", b"  ", b"1e9 ", b"\x00\x00", b"4\\5 "])
    ),
    "rows-absurd": _spec("absurd", 2, ds=_set("Rows", [0, 1, 65535])),
    "columns-absurd": _spec("absurd", 2, ds=_set("Columns", [0, 1, 65535])),
    "photometric-wrong": _spec("photometric", 4, ds=_photometric),
    "bit-depth-wrong": _spec("photometric", 4, ds=_bit_depth),
    "jpeg-flip-scan": _spec("pixel", 4, "jpeg", by=_jpeg("flip-scan"), pixel_only=True),
    "jpeg-zero-scan": _spec("pixel", 3, "jpeg", by=_jpeg("zero-scan"), pixel_only=True),
    "jpeg-garbage-scan": _spec("pixel", 3, "jpeg", by=_jpeg("garbage-scan"), pixel_only=True),
    "jpeg-cut-eoi": _spec("pixel", 3, "jpeg", by=_jpeg("cut-eoi"), pixel_only=True),
    "jpeg-markers-in-scan": _spec("pixel", 2, "jpeg", by=_jpeg("markers-in-scan"), pixel_only=True),
    "jpeg-huffman": _spec("pixel", 2, "jpeg", by=_jpeg("huffman"), pixel_only=True),
    "raw-random-pixels": _spec("pixel", 2, "raw", by=_raw_pixels, pixel_only=True),
    "header-byte-flips": _spec("bytes", 4, by=_flip_header),
    "duplicate-element": _spec("bytes", 2, by=_duplicate_element),
    "transfer-syntax-mismatch": _spec("bytes", 2, by=_ts_mismatch),
    "huge-private-tag": _spec("huge", 0.4, ds=_huge_private(HUGE)),
    "huge-text": _spec("huge", 0.6, ds=_huge_text),
    "wrong-sop-class": _spec("sop", 3, ds=_wrong_sop),
    "wrong-modality": _spec("sop", 1, ds=_modality),
    "missing-uid": _spec(
        "uid", 3, ds=_delete("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID")
    ),
    "invalid-uid": _spec("uid", 2, ds=_invalid_uid),
    "missing-pixel-data": _spec("absurd", 1, ds=_delete("PixelData")),
    "random-bytes": _spec("non-dicom", 1.5),
    "png": _spec("non-dicom", 1),
    "empty": _spec("non-dicom", 0.5),
    "preamble-only": _spec("non-dicom", 0.5),
    "text": _spec("non-dicom", 0.5),
}
_NAMES = list(KINDS)
_WEIGHTS = np.array([KINDS[k][1] for k in _NAMES], float)
_WEIGHTS /= _WEIGHTS.sum()


def make(seed: int, index: int, kind: str | None = None) -> Mutant:
    """Mutant ``index`` of the campaign ``seed`` (its kind drawn by weight unless given)."""
    warnings.simplefilter("ignore")  # pydicom warns about the invalid values set on purpose
    rng = np.random.default_rng([seed, index])
    kind = kind or str(_NAMES[int(rng.choice(len(_NAMES), p=_WEIGHTS))])
    family, _, seeds, ds_mut, byte_mut, pixel_only = KINDS[kind]
    syntax = seeds if seeds != "any" else str(_pick(rng, ["jpeg", "raw"]))
    frames = int(rng.integers(4, 9))
    ds = seed_dataset(seed, index, syntax, frames)
    sop_uid = str(ds.SOPInstanceUID)
    uids = (sop_uid, str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID))
    ts = str(ds.file_meta.TransferSyntaxUID)
    if family == "non-dicom":
        data = _non_dicom(rng, kind)
        return Mutant(
            index, kind, family, "none", data, sop_uid, transfer_syntax=ExplicitVRLittleEndian, uids=uids
        )
    if ds_mut is not None:
        ds_mut(rng, ds)
    if kind == "transfer-syntax-mismatch":
        ts = str(_pick(rng, [t for t in SYNTAXES if t != ts]))
        ds.file_meta.TransferSyntaxUID = ts
    sop_class = str(ds.file_meta.get("MediaStorageSOPClassUID", UltrasoundMultiFrameImageStorage))
    buf = bytearray(_encode(ds))
    if byte_mut is not None:
        buf = byte_mut(rng, buf, syntax)
    return Mutant(index, kind, family, syntax, bytes(buf), sop_uid, sop_class, ts, pixel_only, uids)


def _encode(ds: Dataset) -> bytes:
    """Explicit VR LE encoding whatever the meta says (the meta may lie: transfer-syntax-mismatch)."""
    meta = _meta_bytes(
        str(
            ds.file_meta.get(
                "MediaStorageSOPClassUID", ds.get("SOPClassUID", UltrasoundMultiFrameImageStorage)
            )
        ),
        str(ds.file_meta.get("MediaStorageSOPInstanceUID", ds.get("SOPInstanceUID", "1.2.3"))),
        str(ds.file_meta.TransferSyntaxUID),
    )
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return meta + body.getvalue()


def _non_dicom(rng: Rng, kind: str) -> bytes:
    if kind == "random-bytes":
        return bytes(rng.integers(0, 256, int(rng.integers(1, 200_000)), np.uint8))
    if kind == "png":
        return PNG_BYTES
    if kind == "empty":
        return b""
    if kind == "preamble-only":
        return b"\0" * 128 + b"DICM"
    return b"PatientName=CHAOS^PHI^MARKER\n" * int(rng.integers(1, 50))


if __name__ == "__main__":  # a quick look: python bench/chaos/mutate.py [N]
    from collections import Counter

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    print(Counter(make(1, i).kind for i in range(n)).most_common())
