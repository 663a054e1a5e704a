"""In-process conformance check of every output, in the worker's hot path (no subprocess).

``dciodvfy``/``dcentvfy`` (dicom3tools) are the reference validators, but two processes that load
the standard's tables per object cost more than writing the objects. This check covers the same
classes of error they report for what lusai writes, on the bytes that will be stored, read back
the way a consumer reads them:

* values: every element converted under pydicom's strict value validation (VR character sets,
  lengths, DA/TM/UI/IS/DS syntax) - dciodvfy's "bad value" and "value length" errors;
* file meta: syntax readable, Media Storage SOP Class/Instance UIDs equal to the dataset's;
* IOD: the Type 1 (present, not empty) and Type 2 (present) attributes of the modules lusai
  writes, from the module tables of PS3.3 (A.51 Segmentation, A.35.13 Comprehensive 3D SR, A.8.5
  Multi-frame True Colour SC), and the enumerated values lusai relies on;
* structure: SEG frame count, functional groups and pixel data length agree, each frame names
  an existing segment and a frame of the source; SR content items have the attributes of their
  value type (C.17.3), and every instance they reference is in the evidence (C.17.2.2);
* entities: Patient and Study attributes equal to the source's (what dcentvfy checks);
* consumers: highdicom parses the SEG (and decodes a frame) and the SR tree.

:mod:`workers.audit` runs dicom3tools on the stored objects after delivery, so a class of error
this check misses is still found and counted; tests hold both to the same deliberately broken
objects (``tests/workers/write_dicom/test_conformance.py``).
"""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence

import highdicom as hd
import pydicom
from pydicom import config
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage
from pydicom.valuerep import validate_value

from service.core.dicom import LABEL_MAP_SEGMENTATION_STORAGE
from workers.write_dicom.common import PATIENT_STUDY_KEYWORDS, PATIENT_STUDY_TYPE2

#: (Type 1, Type 2) top-level attributes of each output IOD (PS3.3 module tables).
_COMMON_1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")
_COMMON_2 = (*PATIENT_STUDY_TYPE2, "Manufacturer")
_IMAGE_1 = (
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "PixelData",
    "NumberOfFrames",
)
_SEG_1 = (
    *_IMAGE_1,
    "SeriesNumber",  # C.8.20.1 Segmentation Series
    "InstanceNumber",
    "ContentDate",
    "ContentTime",
    "ImageType",
    "ContentLabel",
    "SegmentationType",
    "SegmentSequence",
    "DimensionOrganizationSequence",
    "DimensionIndexSequence",
    "PerFrameFunctionalGroupsSequence",
    "SharedFunctionalGroupsSequence",
    "ManufacturerModelName",  # C.7.5.2 Enhanced General Equipment
    "DeviceSerialNumber",
    "SoftwareVersions",
    "ReferencedSeriesSequence",  # C.12.2 Common Instance Reference (derived from the source)
)
_SEG_2 = ("ContentDescription", "ContentCreatorName")
_SR_1 = (
    "SeriesNumber",  # C.17.1 SR Document Series
    "InstanceNumber",  # C.17.2 SR Document General
    "CompletionFlag",
    "VerificationFlag",
    "ContentDate",
    "ContentTime",
    "ValueType",  # C.17.3 SR Document Content (root)
    "ConceptNameCodeSequence",
    "ContinuityOfContent",
    "ContentTemplateSequence",
    "CurrentRequestedProcedureEvidenceSequence",  # 1C: the report references the source
)
_SR_2 = ("ReferencedPerformedProcedureStepSequence", "PerformedProcedureCodeSequence")
_SC_1 = (*_IMAGE_1, "ConversionType", "FrameIncrementPointer", "BurnedInAnnotation")
_ENUMERATED = {
    "SegmentationType": {"BINARY", "LABELMAP"},
    "SegmentsOverlap": {"YES", "UNDEFINED", "NO"},
    "CompletionFlag": {"PARTIAL", "COMPLETE"},
    "VerificationFlag": {"UNVERIFIED", "VERIFIED"},
    "ContinuityOfContent": {"SEPARATE", "CONTINUOUS"},
    "BurnedInAnnotation": {"YES", "NO"},
    "SegmentAlgorithmType": {"AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"},
    "RelationshipType": {
        "CONTAINS",
        "HAS PROPERTIES",
        "HAS OBS CONTEXT",
        "HAS ACQ CONTEXT",
        "INFERRED FROM",
        "SELECTED FROM",
        "HAS CONCEPT MOD",
    },
}
#: Attributes each SR content item of a value type needs (C.17.3, C.18).
_SR_VALUE_ATTRIBUTES = {
    "CONTAINER": ("ContinuityOfContent",),
    "CODE": ("ConceptCodeSequence",),
    "NUM": ("MeasuredValueSequence",),
    "TEXT": ("TextValue",),
    "UIDREF": ("UID",),
    "IMAGE": ("ReferencedSOPSequence",),
    "COMPOSITE": ("ReferencedSOPSequence",),
    "SCOORD": ("GraphicType", "GraphicData"),
    "SCOORD3D": ("GraphicType", "GraphicData", "ReferencedFrameOfReferenceUID"),
    "DATETIME": ("DateTime",),
    "DATE": ("Date",),
    "TIME": ("Time",),
    "PNAME": ("PersonName",),
}
_CODE_1 = ("CodeValue", "CodingSchemeDesignator", "CodeMeaning")
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN", "SQ"})
_STRING_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"}
)


class _Problems:
    def __init__(self) -> None:
        self.errors: list[str] = []

    def add(self, message: str) -> None:
        self.errors.append(f"Error - {message}")


def check_output(source: Dataset, data: bytes) -> list[str]:
    """Errors (empty when conformant) of one encoded output of ``source``; never raises."""
    p = _Problems()
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:
        return [f"Error - not readable as a DICOM file ({type(exc).__name__})"]
    try:
        _check_values(ds, p)
        _check_meta(ds, p)
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in (SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE):
            _require(ds, (*_COMMON_1, *_SEG_1), (*_COMMON_2, *_SEG_2), p)
            _check_seg(ds, source, p)
        elif ds.get("Modality") == "SR":
            _require(ds, (*_COMMON_1, *_SR_1), (*_COMMON_2, *_SR_2), p)
            _check_sr(ds, p)
        else:
            _require(ds, (*_COMMON_1, *_SC_1), _COMMON_2, p)
        _check_entities(ds, source, p)
        if not p.errors:
            _check_consumers(ds, data, p)
    except Exception as exc:  # a check tripping over a malformed object is a finding, not a crash
        p.add(f"object could not be checked ({type(exc).__name__})")
    return p.errors


def _walk(ds: Dataset, path: str = "") -> Iterator[tuple[str, pydicom.DataElement]]:
    for elem in ds:
        yield f"{path}{elem.keyword or elem.tag}", elem
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                yield from _walk(item, f"{path}{elem.keyword}[{i}].")


def _check_values(ds: Dataset, p: _Problems) -> None:
    """Every value converted and validated as its VR requires (raising, whatever pydicom's
    configured validation mode), and enumerated values among theirs: one walk of the dataset
    (a long cine's SEG has tens of thousands of elements)."""
    for path, elem in _walk(ds):
        if elem.VR in _BINARY_VRS or elem.is_empty:
            continue
        allowed = _ENUMERATED.get(elem.keyword)
        if allowed is not None and str(elem.value) not in allowed:
            p.add(f"<{path}> value not one of the enumerated values {sorted(allowed)}")
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        for value in values:
            if value is None or value == "":
                continue
            if elem.VR in _STRING_VRS:  # as written: IS/DS keep the string they were read from
                value = getattr(value, "original_string", None) or str(value)
            try:
                validate_value(elem.VR, value, config.RAISE)
            except (ValueError, TypeError) as exc:
                p.add(f"<{path}> bad value for VR {elem.VR} ({str(exc).splitlines()[0][:80]})")
                break


def _check_meta(ds: Dataset, p: _Problems) -> None:
    meta = ds.file_meta
    if meta.get("MediaStorageSOPClassUID") != ds.get("SOPClassUID"):
        p.add("MediaStorageSOPClassUID differs from SOPClassUID")
    if meta.get("MediaStorageSOPInstanceUID") != ds.get("SOPInstanceUID"):
        p.add("MediaStorageSOPInstanceUID differs from SOPInstanceUID")
    if not meta.get("TransferSyntaxUID"):
        p.add("no TransferSyntaxUID in the file meta information")


def _require(ds: Dataset, type1: Sequence[str], type2: Sequence[str], p: _Problems) -> None:
    for kw in type1:
        if kw not in ds:
            p.add(f"<{kw}> missing Type 1 attribute")
        elif ds[kw].is_empty:
            p.add(f"<{kw}> empty Type 1 attribute")
    for kw in type2:
        if kw not in ds:
            p.add(f"<{kw}> missing Type 2 attribute")


def _check_entities(ds: Dataset, source: Dataset, p: _Problems) -> None:
    for kw in PATIENT_STUDY_KEYWORDS:  # what the writers copy from the source, verbatim
        if (ds.get(kw) or None) != (source.get(kw) or None):  # absent and empty are the same entity
            p.add(f"<{kw}> differs from the source (same patient and study expected)")
    if ds.get("SeriesInstanceUID") == source.get("SeriesInstanceUID"):
        p.add("SeriesInstanceUID is the source's (an output is a series of its own)")


def _frames_of(source: Dataset) -> int:
    return int(source.get("NumberOfFrames", 1) or 1)


def _check_seg(ds: Dataset, source: Dataset, p: _Problems) -> None:
    frames = int(ds.get("NumberOfFrames", 0) or 0)
    groups = ds.get("PerFrameFunctionalGroupsSequence") or DicomSequence()
    if frames != len(groups):
        p.add(f"NumberOfFrames {frames} but {len(groups)} per-frame functional group items")
    binary = ds.get("SegmentationType") == "BINARY"
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if (binary and bits != 1) or (not binary and bits not in (8, 16)):
        p.add(f"BitsAllocated {bits} does not fit SegmentationType {ds.get('SegmentationType')}")
    if ds.get("SamplesPerPixel") != 1 or ds.get("PhotometricInterpretation") != "MONOCHROME2":
        p.add("a SEG has one sample per pixel, MONOCHROME2")
    if (ds.get("Rows"), ds.get("Columns")) != (source.get("Rows"), source.get("Columns")):
        p.add("Rows/Columns differ from the source the SEG is derived from")
    numbers = [int(s.get("SegmentNumber", 0) or 0) for s in ds.get("SegmentSequence", [])]
    if numbers != list(range(1, len(numbers) + 1)):
        p.add("SegmentNumber values are not 1..n in order")
    for i, item in enumerate(ds.get("SegmentSequence", [])):
        for kw in (
            "SegmentLabel",
            "SegmentAlgorithmType",
            "SegmentedPropertyCategoryCodeSequence",
            "SegmentedPropertyTypeCodeSequence",
        ):
            if kw not in item or item[kw].is_empty:
                p.add(f"<SegmentSequence[{i}].{kw}> missing Type 1 attribute")
        if (
            item.get("SegmentAlgorithmType") != "MANUAL"
            and "SegmentationAlgorithmIdentificationSequence" not in item
        ):
            p.add(f"<SegmentSequence[{i}]> automatic segment without algorithm identification")
    dims = len(ds.get("DimensionIndexSequence", []))
    n_src, src_uid = _frames_of(source), source.SOPInstanceUID
    for i, group in enumerate(groups):
        content = group.get("FrameContentSequence")
        if (
            not content
            or "DimensionIndexValues" not in content[0]
            or dims != content[0]["DimensionIndexValues"].VM
        ):
            p.add(f"<PerFrameFunctionalGroupsSequence[{i}]> DimensionIndexValues do not match the dimensions")
        if binary:
            ident = group.get("SegmentIdentificationSequence")
            if not ident or int(ident[0].get("ReferencedSegmentNumber", 0) or 0) not in numbers:
                p.add(f"<PerFrameFunctionalGroupsSequence[{i}]> frame of no described segment")
        try:
            ref = group.DerivationImageSequence[0].SourceImageSequence[0]
            frame_ok = 1 <= int(ref.ReferencedFrameNumber) <= n_src
            if ref.ReferencedSOPInstanceUID != src_uid or not frame_ok:
                p.add(f"<PerFrameFunctionalGroupsSequence[{i}]> source reference outside the source cine")
        except (AttributeError, IndexError, TypeError, ValueError):
            p.add(f"<PerFrameFunctionalGroupsSequence[{i}]> no source image reference")
    if not ds.file_meta.TransferSyntaxUID.is_compressed and "PixelData" in ds:
        expected = -(-frames * int(ds.Rows) * int(ds.Columns) * bits // 8)
        if len(ds.PixelData) != expected + expected % 2:
            p.add(f"PixelData is {len(ds.PixelData)} bytes, {expected + expected % 2} expected")


def _content_items(items: Sequence[Dataset], path: str) -> Iterator[tuple[str, Dataset]]:
    for i, item in enumerate(items):
        here = f"{path}[{i}]"
        yield here, item
        yield from _content_items(item.get("ContentSequence", []), f"{here}.ContentSequence")


def _check_code(item: Dataset, path: str, p: _Problems) -> None:
    for kw in _CODE_1:
        if kw not in item or item[kw].is_empty:
            p.add(f"<{path}.{kw}> missing Type 1 attribute of a code")


def _check_sr(ds: Dataset, p: _Problems) -> None:
    if ds.get("ValueType") != "CONTAINER":
        p.add("the SR root content item is not a CONTAINER")
    evidence = {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.get("ReferencedSeriesSequence", [])
        for sop in series.get("ReferencedSOPSequence", [])
    }
    for path, item in _content_items(ds.get("ContentSequence", []), "ContentSequence"):
        if "ReferencedContentItemIdentifier" in item:  # by-reference relationship (C.17.3.2.5)
            continue
        value_type = item.get("ValueType")
        if not item.get("RelationshipType"):
            p.add(f"<{path}> content item without RelationshipType")
        if value_type not in _SR_VALUE_ATTRIBUTES:
            p.add(f"<{path}> unknown ValueType {value_type!r}")
            continue
        if not item.get("ConceptNameCodeSequence") and value_type != "CONTAINER":
            p.add(f"<{path}> {value_type} content item without a concept name")
        for code in item.get("ConceptNameCodeSequence", []):
            _check_code(code, f"{path}.ConceptNameCodeSequence", p)
        for kw in _SR_VALUE_ATTRIBUTES[value_type]:
            if kw not in item or (item[kw].is_empty and value_type != "NUM"):
                p.add(f"<{path}> {value_type} content item without {kw}")
        for code in item.get("ConceptCodeSequence", []):
            _check_code(code, f"{path}.ConceptCodeSequence", p)
        if value_type == "NUM":
            for value in item.get("MeasuredValueSequence", []):
                if "NumericValue" not in value or not value.get("MeasurementUnitsCodeSequence"):
                    p.add(f"<{path}> measured value without a number or units")
        if value_type == "SCOORD":
            data = item.get("GraphicData") or []
            if len(data) % 2 or not data:
                p.add(f"<{path}> GraphicData is not a list of (column, row) pairs")
        for ref in item.get("ReferencedSOPSequence", []) if value_type in ("IMAGE", "COMPOSITE") else []:
            if str(ref.get("ReferencedSOPInstanceUID")) not in evidence:
                p.add(f"<{path}> references an instance missing from the evidence sequence")


def _check_consumers(ds: Dataset, data: bytes, p: _Problems) -> None:
    """Parsed by the library a consumer would use (after the cheaper checks passed)."""
    try:
        if ds.Modality == "SEG":
            seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
            if seg.number_of_segments != len(ds.SegmentSequence):
                p.add("highdicom sees a different number of segments")
            ref = ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
            seg.get_pixels_by_source_frame(
                ref.ReferencedSOPInstanceUID, source_frame_numbers=[int(ref.ReferencedFrameNumber)]
            )
        elif ds.SOPClassUID == Comprehensive3DSRStorage:  # what lusai writes: parse what is read
            hd.sr.Comprehensive3DSR.from_dataset(ds, copy=False)
        elif ds.Modality == "SR":
            hd.sr.srread(io.BytesIO(data))
        else:
            _ = ds.pixel_array
    except Exception as exc:
        p.add(f"a consumer cannot read the object ({type(exc).__name__}: {str(exc)[:120]})")
