"""Coded concepts used by the lusai DICOM outputs (SEG, SR, SC).

Standard concepts come from SNOMED CT (SCT) and DICOM (DCM, PS3.16). Meanings were checked
against pydicom's bundled PS3.16 concept tables (``pydicom.sr.codedict``):

* Pleura SCT 3120008, Pleural effusion SCT 60046008, Rib SCT 113197003, Lung SCT 39607008,
  Diagnostic ultrasonography SCT 16310003 (CID 6028/6029), Anatomical Structure SCT 91723000 and
  Morphologically Abnormal Structure SCT 49755003 (CID 7150 segmentation categories).
* Consolidation uses SCT 95436008 "Lung consolidation". SCT 9656002, proposed in the design
  brief, is absent from the PS3.16 tables and could not be confirmed to mean consolidation, so it
  is not used (see docs/dicom-outputs.md).

A-lines, B-lines, the LUS (Soldati) score, the percentage of pleura with B-lines and the B-line
count have no standard codes. They use the private coding scheme ``99LUSAI`` (PS3.3 8.2: a
designator starting with "99" is private), which every object that uses it declares in
CodingSchemeIdentificationSequence (0008,0110) (PS3.3 C.12.1.1.2).

A cine that is not gradable (workers/score/gradability.py) is stated with the standard concepts
of the quality assessment template (PS3.16 TID 4025 rows, CID 6044): DCM 111050 "Quality
Assessment" = DCM 111235 "Unusable - Quality renders image unusable", and DCM 111052 "Quality
Finding" = the reason. The standard findings (CID 6135) are radiographic (exposure, grid,
detector); ultrasound reasons such as "pleural line not visible" have no code, so each reason code
of the pipeline has a private 99LUSAI concept (:data:`NOT_GRADABLE_REASONS`).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from workers.domain import SegmentClass
from workers.score.gradability import REASONS

PRIVATE_SCHEME = "99LUSAI"
PRIVATE_SCHEME_NAME = "lusai lung ultrasound concepts"
PRIVATE_SCHEME_RESPONSIBLE = "lusai"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# --- standard concepts -------------------------------------------------------------------------
PLEURA = Code("3120008", "SCT", "Pleura")
PLEURAL_EFFUSION = Code("60046008", "SCT", "Pleural effusion")
RIB = Code("113197003", "SCT", "Rib")
LUNG_CONSOLIDATION = Code("95436008", "SCT", "Lung consolidation")
LUNG = Code("39607008", "SCT", "Lung")
ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
DIAGNOSTIC_ULTRASONOGRAPHY = Code("16310003", "SCT", "Diagnostic ultrasonography")
PRESENT: Code = codes.SCT.Present
ABSENT: Code = codes.SCT.Absent
RIGHT: Code = codes.SCT.Right
LEFT: Code = codes.SCT.Left
ARTIFICIAL_INTELLIGENCE: Code = codes.DCM.ArtificialIntelligence
AREA = Code("42798000", "SCT", "Area")
QUALITY_ASSESSMENT: Code = codes.DCM.QualityAssessment
QUALITY_FINDING: Code = codes.DCM.QualityFinding
UNUSABLE: Code = codes.DCM.UnusableQualityRendersImageUnusable

# --- private concepts (99LUSAI) ----------------------------------------------------------------
ULTRASOUND_ARTIFACT = _private("ARTIFACT", "Ultrasound artifact")
A_LINE = _private("ALINE", "A-line artifact")
B_LINE = _private("BLINE", "B-line artifact")
LUS_SCORE = _private("LUSSCORE", "Lung ultrasound score")
FRAME_LUS_SCORE = _private("FRAMESCORE", "Lung ultrasound score of frame")
B_LINE_PLEURA_PERCENT = _private("BLPCT", "Percentage of pleural line with B-lines")
B_LINE_COUNT = _private("BLCOUNT", "B-line count")
B_LINE_ARTIFACT_SCORE = _private("BLASCORE", "B-line artifact score")
PLEURAL_LINE_IRREGULARITY = _private("PLIRREG", "Pleural line irregularity")
LUS_VIDEO_FINDINGS = _private("LUSVIDEO", "Lung ultrasound cine findings")
LUS_FRAME_SCORES = _private("LUSFRAMES", "Lung ultrasound per-frame scores")
LUS_KEY_FRAME = _private("LUSKEY", "Lung ultrasound key frame")
#: Reason code of workers/score/gradability.py -> its Quality Finding concept.
NOT_GRADABLE_REASONS: dict[str, Code] = {
    reason: _private(value, REASONS[reason])
    for reason, value in (
        ("too-few-frames", "FEWFRAMES"),
        ("no-contact", "NOCONTACT"),
        ("noise", "NOISE"),
        ("rib-shadow", "RIBSHADOW"),
        ("no-pleura", "NOPLEURA"),
    )
}

# --- units (UCUM) ------------------------------------------------------------------------------
UNIT_SCORE = Code("{score}", "UCUM", "score")
UNIT_PERCENT = Code("%", "UCUM", "percent")
UNIT_COUNT = Code("{count}", "UCUM", "count")
UNIT_MM2 = Code("mm2", "UCUM", "square millimeter")
UNIT_NONE = Code("1", "UCUM", "no units")


#: (label, category, type) of each SEG segment, keyed by the model's label value.
SEGMENT_CONCEPTS: dict[SegmentClass, tuple[str, Code, Code]] = {
    SegmentClass.PLEURAL_LINE: ("Pleural line", ANATOMICAL_STRUCTURE, PLEURA),
    SegmentClass.A_LINE: ("A-lines", ULTRASOUND_ARTIFACT, A_LINE),
    SegmentClass.B_LINE: ("B-lines", ULTRASOUND_ARTIFACT, B_LINE),
    SegmentClass.CONSOLIDATION: ("Consolidation", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, LUNG_CONSOLIDATION),
    SegmentClass.EFFUSION: ("Pleural effusion", MORPHOLOGICALLY_ABNORMAL_STRUCTURE, PLEURAL_EFFUSION),
    SegmentClass.RIB_SHADOW: ("Rib / acoustic shadow", ANATOMICAL_STRUCTURE, RIB),
}

#: Display colours (sRGB) shared by the SEG (as CIELab) and the burned-in overlay.
SEGMENT_RGB: dict[SegmentClass, tuple[int, int, int]] = {
    SegmentClass.PLEURAL_LINE: (255, 215, 0),
    SegmentClass.A_LINE: (0, 180, 255),
    SegmentClass.B_LINE: (255, 40, 40),
    SegmentClass.CONSOLIDATION: (200, 0, 255),
    SegmentClass.EFFUSION: (0, 220, 90),
    SegmentClass.RIB_SHADOW: (140, 140, 140),
}


def coding_scheme_identification() -> Dataset:
    """Item of CodingSchemeIdentificationSequence declaring ``99LUSAI`` (PS3.3 C.12.1.1.2)."""
    item = Dataset()
    item.CodingSchemeDesignator = PRIVATE_SCHEME
    item.CodingSchemeName = PRIVATE_SCHEME_NAME
    item.CodingSchemeResponsibleOrganization = PRIVATE_SCHEME_RESPONSIBLE
    return item


def declare_private_scheme(ds: Dataset) -> None:
    """Add the ``99LUSAI`` declaration to ``ds`` once (SOP Common module)."""
    seq = list(ds.get("CodingSchemeIdentificationSequence", []))
    if not any(i.get("CodingSchemeDesignator") == PRIVATE_SCHEME for i in seq):
        seq.append(coding_scheme_identification())
    ds.CodingSchemeIdentificationSequence = seq
