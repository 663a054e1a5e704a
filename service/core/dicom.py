"""DICOM facts shared by the SCP, the workers and the CLI: SOP classes, output kinds, C-STORE statuses.

Public names: :data:`US_SOP_CLASSES` (what lusai analyses), :data:`US_MULTIFRAME_RETIRED`,
:data:`US_IMAGE_RETIRED`, :class:`OutputKind` and :data:`OUTPUT_SOP_CLASSES` (what it writes),
:data:`LABEL_MAP_SEGMENTATION_STORAGE`, the ``STATUS_*`` C-STORE status codes lusai answers with,
:func:`stored` and :func:`permanent_failure` (how an answer it received is read),
:class:`UltrasoundRegion` and :func:`ultrasound_region` (the calibrated region millimetres come from).

SOP classes come from :mod:`pydicom.uid` by name; only UIDs pydicom 3.0 does not name are written
out. Status categories come from :func:`pynetdicom.status.code_to_category` (PS3.7 C.4), so the
receiver, the delivery worker and ``lusai send`` read a peer's answer the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    SegmentationStorage,
    UltrasoundImageStorage,
    UltrasoundMultiFrameImageStorage,
)
from pynetdicom.status import STATUS_SUCCESS as _SUCCESS
from pynetdicom.status import STATUS_WARNING as _WARNING
from pynetdicom.status import code_to_category

# --- SOP classes -------------------------------------------------------------------------------
#: Retired ultrasound classes (PS3.6 Annex A) that older scanners still send; pydicom.uid has no
#: constants for them (``UID(...).keyword`` still names them).
US_MULTIFRAME_RETIRED = UID("1.2.840.10008.5.1.4.1.1.3")
US_IMAGE_RETIRED = UID("1.2.840.10008.5.1.4.1.1.6")
#: Ultrasound Image, Ultrasound Multi-frame Image and their retired predecessors: what is analysed.
US_SOP_CLASSES: frozenset[UID] = frozenset(
    {UltrasoundMultiFrameImageStorage, UltrasoundImageStorage, US_MULTIFRAME_RETIRED, US_IMAGE_RETIRED}
)
#: Label Map Segmentation Storage (PS3.4 B.5); newer than pydicom 3.0's UID table.
LABEL_MAP_SEGMENTATION_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.7")


class OutputKind(StrEnum):
    """The objects lusai writes per analysed cine. The values enter the output UIDs
    (workers/write_dicom/uids.py): changing one changes every future UID of that kind."""

    SEG = "SEG"
    SR = "SR"
    SC = "SC"  # the burned-in overlay, for viewers without SEG support


#: SOP classes each kind may have (a SEG is BINARY or LABELMAP).
OUTPUT_SOP_CLASSES: dict[OutputKind, frozenset[UID]] = {
    OutputKind.SEG: frozenset({SegmentationStorage, LABEL_MAP_SEGMENTATION_STORAGE}),
    OutputKind.SR: frozenset({Comprehensive3DSRStorage}),
    OutputKind.SC: frozenset({MultiFrameTrueColorSecondaryCaptureImageStorage}),
}

# --- C-STORE statuses lusai answers with (PS3.4 B.2.3, PS3.7 C.4.2) ----------------------------
STATUS_SUCCESS = 0x0000  # Success (also for a duplicate and for a stored-and-ignored object)
STATUS_OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources (storage full, object too large)
STATUS_DATA_SET_MISMATCH = 0xA900  # Error: Data Set does not match SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand (the whole 0xCxxx range)
STATUS_SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
STATUS_PROCESSING_FAILURE = 0x0110  # Failure: Processing failure


def stored(status: int) -> bool:
    """Whether a C-STORE answer means the peer kept the object: Success or any Warning
    (e.g. 0xB000 coercion, 0xB006 elements discarded, 0xB007 data set does not match SOP class)."""
    return code_to_category(status) in (_SUCCESS, _WARNING)


def permanent_failure(status: int) -> bool:
    """A refusal that sending the same object again cannot fix: the peer does not take the SOP
    class, finds the data set inconsistent with it, or cannot understand it. Out of resources,
    processing failures and unknown codes may pass, so they are retried."""
    return (
        status in (STATUS_SOP_CLASS_NOT_SUPPORTED, STATUS_DATA_SET_MISMATCH)
        or (status & 0xF000) == STATUS_CANNOT_UNDERSTAND
    )


# --- ultrasound calibration (PS3.3 C.8.5.5.1) -------------------------------------------------
_SPATIAL_2D = 1  # RegionSpatialFormat: 2D (tissue or flow)
_DATA_TISSUE = 1  # RegionDataType: Tissue
_UNITS_CM = 3  # PhysicalUnitsX/YDirection: cm


@dataclass(frozen=True)
class UltrasoundRegion:
    """One SequenceOfUltrasoundRegions item: pixel bounds (inclusive) and, when the region is
    calibrated in cm on both axes, its (row, column) pixel spacing in mm."""

    x0: int
    y0: int
    x1: int
    y1: int
    spacing_mm: tuple[float, float] | None

    @property
    def area(self) -> int:
        return (self.x1 - self.x0 + 1) * (self.y1 - self.y0 + 1)


def ultrasound_region(ds: Dataset | None) -> UltrasoundRegion | None:
    """The region whose calibration every millimetre of one cine comes from, or None.

    Among the 2D regions, a calibrated one (cm on both axes) wins, then a Tissue region over
    colour flow, then the largest. Scanners list regions in no fixed order and add small 2D ones
    (a colour box, a zoom inset, a reference thumbnail), so "the first" depends on the vendor and
    can be an inset with another scale; the imaging sector is the largest calibrated region.
    Preprocessing (sector search and mm per pixel, hence every score area) and the SEG's Pixel
    Measures and the SR's fallback region all call this, so they cannot pick different regions.
    """
    best: tuple[tuple[bool, bool, int], UltrasoundRegion] | None = None
    regions = ds.get("SequenceOfUltrasoundRegions", []) if ds is not None else []
    if not isinstance(regions, Sequence):
        return None  # not a sequence at all (a wrong VR): no region to trust
    for item in regions:
        if not isinstance(item, Dataset) or item.get("RegionSpatialFormat") != _SPATIAL_2D:
            continue
        bounds = [item.get(k) for k in ("RegionLocationMinX0", "RegionLocationMinY0")]
        bounds += [item.get(k) for k in ("RegionLocationMaxX1", "RegionLocationMaxY1")]
        if any(b is None for b in bounds):
            continue  # Type 1 attributes missing: not a region to trust
        try:
            x0, y0, x1, y1 = (int(b) for b in bounds)
            region = UltrasoundRegion(x0, y0, x1, y1, _spacing_mm(item))
        except (TypeError, ValueError):
            continue  # values of the wrong type or VR: not a region to trust
        key = (region.spacing_mm is not None, item.get("RegionDataType") == _DATA_TISSUE, region.area)
        if best is None or key > best[0]:
            best = (key, region)
    return None if best is None else best[1]


def _spacing_mm(item: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm of a region calibrated in cm on both axes."""
    if item.get("PhysicalUnitsXDirection") != _UNITS_CM or item.get("PhysicalUnitsYDirection") != _UNITS_CM:
        return None
    dx, dy = float(item.get("PhysicalDeltaX") or 0), float(item.get("PhysicalDeltaY") or 0)
    return (dy * 10.0, dx * 10.0) if dx > 0 and dy > 0 else None
