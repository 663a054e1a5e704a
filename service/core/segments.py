"""The segment table: one row per class of the model's class map.

Public names: :class:`SegmentClass` (label values), :class:`Segment` (a row), :data:`SEGMENTS`
(the rows written as SEG segments, in segment-number order), :data:`SEGMENT_CLASSES` (their
classes), :func:`segment` (the row of a class), :data:`PRIVATE_SCHEME` (the ``99LUSAI`` coding
scheme designator).

Every output that names or colours a class reads it here: the SEG (label, category, type, colour
as CIELab), the SR (label, type), the burned-in overlay SC (label, colour) and the API previews
(label, colour). Copies of these facts drifted apart before; one table keeps what PACS receive and
what the previews show the same. The SEG is the reference: its codes and colours are the ones kept.

Codes are pydicom :class:`~pydicom.sr.coding.Code` values so the core stays free of highdicom;
``workers/write_dicom/codes.py`` turns them into highdicom objects. Standard concepts are SNOMED CT
(SCT); A-lines and B-lines have no standard code and use the private scheme ``99LUSAI`` (see the
module docstring of ``workers/write_dicom/codes.py`` and docs/dicom-outputs.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

from pydicom.sr.coding import Code

#: Private coding scheme designator of lusai's own concepts (PS3.3 8.2: "99" prefix is private).
PRIVATE_SCHEME = "99LUSAI"


class SegmentClass(IntEnum):
    """Label values of the model's class map (one label per pixel); segment number = value."""

    BACKGROUND = 0
    PLEURAL_LINE = 1
    A_LINE = 2
    B_LINE = 3
    CONSOLIDATION = 4
    EFFUSION = 5
    RIB_SHADOW = 6


@dataclass(frozen=True)
class Segment:
    """One class as every output describes it.

    ``label``: display label (SEG SegmentLabel, SR tracking identifier, overlay legend, previews);
    ``category``/``type``: SEG Segmented Property Category/Type (``type`` is also the SR finding
    type); ``rgb``: sRGB display colour (the SEG stores it as CIELab).
    """

    cls: SegmentClass
    label: str
    category: Code
    type: Code
    rgb: tuple[int, int, int]

    @property
    def number(self) -> int:
        """SEG segment number: the label value."""
        return int(self.cls)

    @property
    def name(self) -> str:
        """Short machine name (``"pleural_line"``), as in model packages and training metrics."""
        return self.cls.name.lower()


_ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
_ARTIFACT = Code("ARTIFACT", PRIVATE_SCHEME, "Ultrasound artifact")

#: Rows written as SEG segments, in segment-number order (background has no segment).
SEGMENTS: tuple[Segment, ...] = (
    Segment(
        SegmentClass.PLEURAL_LINE,
        "Pleural line",
        _ANATOMICAL_STRUCTURE,
        Code("3120008", "SCT", "Pleura"),
        (255, 215, 0),
    ),
    Segment(
        SegmentClass.A_LINE,
        "A-lines",
        _ARTIFACT,
        Code("ALINE", PRIVATE_SCHEME, "A-line artifact"),
        (0, 180, 255),
    ),
    Segment(
        SegmentClass.B_LINE,
        "B-lines",
        _ARTIFACT,
        Code("BLINE", PRIVATE_SCHEME, "B-line artifact"),
        (255, 40, 40),
    ),
    Segment(
        SegmentClass.CONSOLIDATION,
        "Consolidation",
        _ABNORMAL_STRUCTURE,
        Code("95436008", "SCT", "Lung consolidation"),
        (200, 0, 255),
    ),
    Segment(
        SegmentClass.EFFUSION,
        "Pleural effusion",
        _ABNORMAL_STRUCTURE,
        Code("60046008", "SCT", "Pleural effusion"),
        (0, 220, 90),
    ),
    Segment(
        SegmentClass.RIB_SHADOW,
        "Rib / acoustic shadow",
        _ANATOMICAL_STRUCTURE,
        Code("113197003", "SCT", "Rib"),
        (140, 140, 140),
    ),
)

#: Classes written as SEG segments, in segment-number order.
SEGMENT_CLASSES: tuple[SegmentClass, ...] = tuple(s.cls for s in SEGMENTS)

_BY_NUMBER: dict[int, Segment] = {s.number: s for s in SEGMENTS}


def segment(cls: SegmentClass | int) -> Segment:
    """The row of ``cls`` (a class or its label value); KeyError for background or unknown values."""
    return _BY_NUMBER[int(cls)]
