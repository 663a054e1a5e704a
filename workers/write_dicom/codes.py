"""Coded concepts used by the lusai DICOM outputs (SEG, SR, SC).

The concepts that describe a segment (category, type, label, colour) are rows of the one segment
table, :mod:`service.core.segments`, with the ``99LUSAI`` designator; this module holds the rest.

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

The SR's layout (``sr.py``) adds: the TID 1500 containers "Derived Imaging Measurements" (DCM
126011) and "Qualitative Evaluations" (UMLS C0034375), where the findings OHIF cannot draw go;
DCM 121106 "Comment" (the text OHIF prints beside the key-frame region), DCM 121140 "Number of
Frames" (the NUM of a cine that has no score), DCM 121191 "Referenced Segment"; and the private
KEYREGION (what the key-frame region is drawn around: a segment type, USREGION or WHOLEIMAGE) and
SEGMENTED (a SEG segment with pixels, referenced by number).
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from service.core.segments import PRIVATE_SCHEME
from workers.score.gradability import REASONS

PRIVATE_SCHEME_NAME = "lusai lung ultrasound concepts"
PRIVATE_SCHEME_RESPONSIBLE = "lusai"


def _private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# --- standard concepts -------------------------------------------------------------------------
LUNG = Code("39607008", "SCT", "Lung")
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
FINDING: Code = codes.DCM.Finding
COMMENT: Code = codes.DCM.Comment  # the TEXT OHIF shows beside a measurement (sr.py)
NUMBER_OF_FRAMES: Code = codes.DCM.NumberOfFrames
REFERENCED_SEGMENT: Code = codes.DCM.ReferencedSegment
#: TID 1500 row 10 and row 12 containers (sr.py): places OHIF does not turn into measurements.
DERIVED_IMAGING_MEASUREMENTS: Code = codes.DCM.DerivedImagingMeasurements
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

# --- private concepts (99LUSAI) ----------------------------------------------------------------
LUS_SCORE = _private("LUSSCORE", "Lung ultrasound score")
FRAME_LUS_SCORE = _private("FRAMESCORE", "Lung ultrasound score of frame")
B_LINE_PLEURA_PERCENT = _private("BLPCT", "Percentage of pleural line with B-lines")
B_LINE_COUNT = _private("BLCOUNT", "B-line count")
B_LINE_ARTIFACT_SCORE = _private("BLASCORE", "B-line artifact score")
PLEURAL_LINE_IRREGULARITY = _private("PLIRREG", "Pleural line irregularity")
LUS_VIDEO_FINDINGS = _private("LUSVIDEO", "Lung ultrasound cine findings")
LUS_FRAME_SCORES = _private("LUSFRAMES", "Lung ultrasound per-frame scores")
LUS_KEY_FRAME = _private("LUSKEY", "Lung ultrasound key frame")
#: What the key-frame region of the SR is drawn around: the pleura or B-line segment type, or:
KEY_FRAME_REGION = _private("KEYREGION", "Key frame region drawn around")
ULTRASOUND_REGION = _private("USREGION", "Ultrasound region")
WHOLE_IMAGE = _private("WHOLEIMAGE", "Whole image")
#: A SEG segment with pixels, named by its segment type and referenced by segment number.
SEGMENTED = _private("SEGMENTED", "Segmented in the cine")
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
UNIT_FRAMES = Code("{frames}", "UCUM", "frames")
UNIT_NONE = Code("1", "UCUM", "no units")


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
