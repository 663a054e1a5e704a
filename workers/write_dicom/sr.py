"""TID 1500 Measurement Report (PS3.16) of the LUS findings, as a Comprehensive 3D SR (A.35.13).

Why the report has the shape it has: what OHIF 3.13.2 does with a TID 1500
--------------------------------------------------------------------------

Read in ``extensions/cornerstone-dicom-sr`` of OHIF 3.13.2 (``getSopClassHandlerModule.ts``,
``utils/addSRAnnotation.ts``, ``utils/getRenderableData.ts``, ``utils/isRehydratable.ts``,
``tools/DICOMSRDisplayTool.ts``, ``components/OHIFCornerstoneSRMeasurementViewport.tsx``) and
``@cornerstonejs/adapters`` ``Cornerstone3D/MeasurementReport.js``:

* ``_getMeasurements`` reads only the "Imaging Measurements" container (DCM 126010) and, in it,
  only the "Measurement Group" containers (DCM 125007). The "Derived Imaging Measurements"
  (DCM 126011) and "Qualitative Evaluations" (UMLS C0034375) containers of TID 1500 are never
  read. Groups are merged by Tracking Unique Identifier (a group without one throws), and every
  group becomes one measurement.
* A group with a SCOORD/SCOORD3D of its own (``_processTID1410Measurement``) takes its
  coordinates from the first one; its text is one line per NUM, "concept meaning: value with two
  decimals and the unit's code value" (``NumericValue ? toFixed(2) : ''``: a value of 0 prints
  as nothing), plus "363698007: <finding site meaning>". Finding, CODE and TEXT items are not
  shown. A closed POLYLINE of 4 or 5 points named "Image Region" is registered as cornerstone's
  RectangleROI and makes the SR "rehydratable" (OHIF offers to turn it into an editable tool).
* A group without one (``_processNonGeometricallyDefinedMeasurement``, TID 1501 and TID 1411)
  takes its coordinates from the SCOORD under each NUM (TID 300 "INFERRED FROM", as OHIF's own
  Length/ROI tools write them); a NUM whose children hold no SCOORD is dropped. Its text is one
  line per TEXT "Comment" (DCM 121106) item ("<text>: "), then one per NUM as above. A group with
  no SCOORD anywhere becomes a measurement with ``coords = []``, and
  ``_checkIfCanAddMeasurementsToDisplaySet`` reads ``measurement.coords[0].ReferencedSOPSequence``
  unguarded: the TypeError stops the SR load and the viewport shows "Something went wrong"
  (issue 14: the cine findings, per-frame scores and segment groups of the former report).
* The image is found by ``"<ReferencedSOPInstanceUID>:<ReferencedFrameNumber or 1>"`` of the
  first coordinate against the display set's image ids (one per frame of a multi-frame
  image), so the SCOORD must reference the source cine with exactly one frame number. SCOORD
  points are image (column, row) and go through ``imageToWorldCoords`` of that frame.
* The SR viewport opens on measurement 0 and jumps to its image; ``DICOMSRDisplayTool`` draws
  POINT (arrow), MULTIPOINT, POLYLINE (a polygon when closed), CIRCLE and ELLIPSE, and throws on
  any other graphic type (POLYGON is SCOORD3D-only anyway); the text box shows the first five
  lines of text.
* Hydration (``MeasurementReport.generateToolState``) wraps each group in try/catch and is only
  offered for groups a cornerstone tool adapter recognises; no group here is one.

The report (``shape="viewer"``, the default) therefore puts into Imaging Measurements exactly one
group, and one OHIF can draw: the key frame (the frame that decided the score), a TID 1501 group
whose NUM - the LUS score, or for a cine that is not gradable the Number of Frames analysed -
is INFERRED FROM a closed POLYLINE SCOORD around the scored pleura on that frame (TID 300 / TID
320), with a TEXT Comment stating the score or why there is none, so that what OHIF prints next
to the region is the result even when the score is 0. Everything else moves to the two TID 1500
containers OHIF does not map, where the standard puts content that is not a measurement group
(TID 1500 rows 10 and 12); nothing is dropped:

* Derived Imaging Measurements (TID 300 NUMs, each with its finding site, algorithm identification
  and the images it was measured on): the cine LUS score, % of pleural line with B-lines, B-line
  count, B-line artifact score, the per-frame scores (one NUM per score value present, listing
  its frames: at most four NUMs whatever the cine's length; one NUM per frame made the SR of a
  1,000-frame cine ~7,000 content items), and the consolidation / effusion areas, each also
  INFERRED FROM its SEG segment;
* Qualitative Evaluations (CODE items): consolidation / effusion / pleural irregularity present or
  absent, or for a cine that is not gradable the quality assessment "Unusable" and the coded
  reason; and one "Segmented in the cine" item per SEG segment with pixels, naming its segment
  type and INFERRED FROM the SEG segment (the references of the former TID 1411 groups: TID 1411
  defines its region by the segment *or* by image regions, never both, so a segment group
  cannot carry the coordinate OHIF needs).

``shape="full"`` keeps every finding in a measurement group (TID 1501 cine findings and per-frame
scores, one TID 1411 group per SEG segment tracked by the segment's Tracking UID), the layout of
readers that look only at measurement groups; OHIF <= 3.13 cannot open it.

In both shapes: observation context = the algorithm as device observer (TID 1004, serial number =
model package hash); procedure reported SCT 16310003 "Diagnostic ultrasonography"; Image Library
(TID 1600) with the source cine; every measurement group and every derived NUM carries the
algorithm identification (TID 4019) with the weights and package hashes; UIDs are derived from
the source, model and kind (deterministic). A cine that is not gradable has no score and no
B-line measurement anywhere (a guess on an unusable image); the segment references stay, like the
SEG. dciodvfy rejects ReferencedSegmentNumber in SR references to a LABELMAP SEG (2026-09), so
segments are referenced from BINARY SEGs only.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.valuerep import DA, TM

from service.core.dicom import ultrasound_region
from service.core.segments import SEGMENT_CLASSES, SegmentClass, segment
from workers.domain import Analysis, VideoFindings
from workers.write_dicom import codes
from workers.write_dicom.common import (
    MANUFACTURER,
    SeriesInfo,
    algorithm_parameters,
    copy_patient_study,
    metadata_copy,
    series_laterality,
)
from workers.write_dicom.uids import derive_uid, device_uid

#: ``build_sr`` shapes: ``viewer`` (default) opens in OHIF <= 3.13, ``full`` keeps every finding
#: in a measurement group (module docstring). Both carry the same content.
SR_SHAPES: tuple[str, ...] = ("viewer", "full")

_KEY_TRACKING_LABEL = "LUS score key frame"
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS
_INFERRED_FROM = hd.sr.RelationshipTypeValues.INFERRED_FROM

#: The second Comment of the key-frame group when its region is not around the pleural line.
_FALLBACK_WORDS = {
    segment(SegmentClass.B_LINE).type.value: "Region: B-lines (no pleural line on this frame)",
    codes.ULTRASOUND_REGION.value: "Region: ultrasound region (no pleural line or B-lines on this frame)",
    codes.WHOLE_IMAGE.value: "Region: whole image (no pleural line or B-lines on this frame)",
}


@dataclass(frozen=True)
class KeyFrameRegion:
    """The SR's region on the key frame: a closed polygon, (column, row) SCOORD image coordinates
    (C.18.6.1.1: pixel (c, r) covers [c, c + 1] x [r, r + 1]), and what it is drawn around."""

    polygon: np.ndarray  # (n, 2) float32, last point == first point
    basis: Code  # segment type of the pleura or the B-lines, ULTRASOUND_REGION or WHOLE_IMAGE
    frame: int  # 1-based frame number of the source cine


def key_frame_region(analysis: Analysis, source: Dataset) -> KeyFrameRegion:
    """Convex hull of the pleural-line pixels on the key frame (``analysis.labels`` is in the
    source's pixel grid); the B-line pixels when the key frame has no pleura, then the ultrasound
    region (SequenceOfUltrasoundRegions, the imaging sector's box), then the whole image."""
    key = analysis.findings.key_frame
    labels = np.asarray(analysis.labels[key])
    for cls in (SegmentClass.PLEURAL_LINE, SegmentClass.B_LINE):
        hull = pixel_hull(labels == int(cls))
        if hull is not None:
            return KeyFrameRegion(hull, segment(cls).type, key + 1)
    rows, cols = labels.shape
    region = ultrasound_region(source)
    if region is not None:
        x0, y0 = max(region.x0, 0), max(region.y0, 0)
        x1, y1 = min(region.x1 + 1, cols), min(region.y1 + 1, rows)  # bounds are inclusive pixels
        if x1 > x0 and y1 > y0:
            return KeyFrameRegion(_rectangle(x0, y0, x1, y1), codes.ULTRASOUND_REGION, key + 1)
    return KeyFrameRegion(_rectangle(0, 0, cols, rows), codes.WHOLE_IMAGE, key + 1)


def _rectangle(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def pixel_hull(mask: np.ndarray) -> np.ndarray | None:
    """Closed convex polygon covering every True pixel of ``mask`` (whole pixels, corners at
    integer coordinates), or None for an empty mask. Only the first and last pixel of each row
    can be hull corners, so the hull is taken over at most four points per row."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    sub = mask[rows]
    left = sub.argmax(axis=1)
    right = mask.shape[1] - sub[:, ::-1].argmax(axis=1)  # one past the last pixel
    corners = np.concatenate(
        [
            np.stack([left, rows], axis=1),
            np.stack([left, rows + 1], axis=1),
            np.stack([right, rows], axis=1),
            np.stack([right, rows + 1], axis=1),
        ]
    )
    hull = convex_hull(corners)
    return np.array([*hull, hull[0]], dtype=np.float32)


def convex_hull(points: np.ndarray) -> list[tuple[int, int]]:
    """Vertices of the convex hull of integer (x, y) points, without collinear points
    (Andrew's monotone chain, exact in integers)."""
    pts = sorted({(int(x), int(y)) for x, y in points})
    if len(pts) <= 2:
        return pts

    def turn(o: tuple[int, int], a: tuple[int, int], b: tuple[int, int]) -> int:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def chain(seq: list[tuple[int, int]]) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []
        for p in seq:
            while len(out) >= 2 and turn(out[-2], out[-1], p) <= 0:
                out.pop()
            out.append(p)
        return out

    lower, upper = chain(pts), chain(pts[::-1])
    return lower[:-1] + upper[:-1]


def key_frame_comments(findings: VideoFindings, region: KeyFrameRegion) -> list[str]:
    """The Comments OHIF prints first beside the key-frame region, one line each: the result, and
    what the region is drawn around when that is not the pleural line. Short: OHIF's text box is
    not wrapped and is clipped at the viewport's edge."""
    if findings.gradable:
        lines = [f"LUS score {findings.score}"]
    else:
        reason = codes.NOT_GRADABLE_REASONS.get(findings.ungradable_reason or "")
        lines = [f"LUS not gradable: {reason.meaning if reason else 'quality renders image unusable'}"]
    if region.basis.value in _FALLBACK_WORDS:
        lines.append(_FALLBACK_WORDS[region.basis.value])
    return lines


def _finding_sites(source: Dataset) -> list[hd.sr.FindingSite]:
    side = series_laterality(source)
    laterality = None if side is None else codes.RIGHT if side == "R" else codes.LEFT
    return [hd.sr.FindingSite(anatomic_location=codes.LUNG, laterality=laterality)]


def _not_gradable(reason: str | None) -> list[hd.sr.QualitativeEvaluation]:
    """Quality Assessment = Unusable and Quality Finding = the reason (codes.py)."""
    finding = codes.NOT_GRADABLE_REASONS.get(reason or "")
    out = [hd.sr.QualitativeEvaluation(codes.QUALITY_ASSESSMENT, codes.UNUSABLE)]
    if finding is not None:
        out.append(hd.sr.QualitativeEvaluation(codes.QUALITY_FINDING, finding))
    return out


def _present(flag: bool) -> Code:
    return codes.PRESENT if flag else codes.ABSENT


def _tracking(root: str, sop_uid: str, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derive_uid(root, sop_uid, "tracking", label), identifier=label)


@dataclass(frozen=True)
class _Report:
    """What every part of the report is built from."""

    source: Dataset
    analysis: Analysis
    sop_uid: str
    root: str
    seg: Dataset | None  # a BINARY SEG whose segments may be referenced, else None
    algorithm: hd.sr.AlgorithmIdentification
    sites: Sequence[hd.sr.FindingSite]

    @property
    def findings(self) -> VideoFindings:
        return self.analysis.findings

    def cine(self, frames: Sequence[int] | None = None) -> hd.sr.SourceImageForMeasurement:
        return hd.sr.SourceImageForMeasurement(
            self.source.SOPClassUID, self.source.SOPInstanceUID, list(frames) if frames else None
        )

    def num(self, name: Code, value: float, unit: Code, **kw: object) -> hd.sr.Measurement:
        """A NUM inside a measurement group: the group carries the algorithm identification (TID
        1501/1410/1411 row "Algorithm Identification"; repeating it in every NUM was 20% of the
        report's content items)."""
        return hd.sr.Measurement(name=name, value=float(value), unit=unit, **kw)  # type: ignore[arg-type]

    def derived_num(
        self, name: Code, value: float, unit: Code, images: Sequence[hd.sr.SourceImageForMeasurement]
    ) -> hd.sr.Measurement:
        """A TID 300 NUM of the Derived Imaging Measurements container: no group around it, so it
        names its finding site, algorithm and source images itself."""
        return hd.sr.Measurement(
            name=name,
            value=float(value),
            unit=unit,
            finding_sites=list(self.sites),
            referenced_images=list(images),
            algorithm_id=self.algorithm,
        )

    @cached_property
    def present_segments(self) -> list[SegmentClass]:
        """Classes with pixels in the cine, in segment-number order."""
        return [cls for cls in SEGMENT_CLASSES if self.analysis.class_frames[:, int(cls)].any()]

    @cached_property
    def referenced_segments(self) -> list[SegmentClass]:
        """Classes with pixels whose BINARY SEG segment has frames (empty without such a SEG);
        computed once: a BINARY SEG of a long cine has thousands of frames to look through."""
        if self.seg is None:
            return []
        with_frames = segment_numbers_with_frames(self.seg)
        return [cls for cls in self.present_segments if int(cls) in with_frames]

    def segment_reference(self, cls: SegmentClass) -> hd.sr.ImageContentItem:
        assert self.seg is not None
        return hd.sr.ImageContentItem(
            name=codes.REFERENCED_SEGMENT,
            referenced_sop_class_uid=self.seg.SOPClassUID,
            referenced_sop_instance_uid=self.seg.SOPInstanceUID,
            referenced_segment_numbers=[int(cls)],
            relationship_type=_INFERRED_FROM,
        )


def key_frame_group(report: _Report) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The one group OHIF draws: a TID 1501 group whose NUM is INFERRED FROM the key-frame region.

    The NUM is the LUS score or, for a cine that is not gradable, the Number of Frames analysed (a
    group needs a NUM to carry a region OHIF reads). It holds nothing but the SCOORD, so older
    OHIF releases, which read a NUM's only child, find it too. The Comments state the result."""
    f, src = report.findings, report.source
    region = key_frame_region(report.analysis, src)
    coordinates = hd.sr.CoordinatesForMeasurement(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=region.polygon,
        source_image=hd.sr.SourceImageForRegion(src.SOPClassUID, src.SOPInstanceUID, [region.frame]),
    )
    if f.gradable:
        num = report.num(codes.LUS_SCORE, f.score, codes.UNIT_SCORE, referenced_coordinates=[coordinates])
    else:
        num = report.num(
            codes.NUMBER_OF_FRAMES,
            report.analysis.frames,
            codes.UNIT_FRAMES,
            referenced_coordinates=[coordinates],
        )
    qualitative = [hd.sr.QualitativeEvaluation(codes.KEY_FRAME_REGION, region.basis)]
    if not f.gradable:
        qualitative += _not_gradable(f.ungradable_reason)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(report.root, report.sop_uid, _KEY_TRACKING_LABEL),
        finding_type=codes.LUS_KEY_FRAME,
        algorithm_id=report.algorithm,
        finding_sites=report.sites,
        source_images=[
            hd.sr.SourceImageForMeasurementGroup(src.SOPClassUID, src.SOPInstanceUID, [region.frame])
        ],
        measurements=[num],
        qualitative_evaluations=qualitative,
    )
    for line in key_frame_comments(f, region):
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(codes.COMMENT, line, relationship_type=_CONTAINS)
        )
    return group


def _cine_values(f: VideoFindings) -> list[tuple[Code, float, Code]]:
    """(concept, value, unit) of the cine-level NUMs of a gradable cine."""
    return [
        (codes.LUS_SCORE, f.score, codes.UNIT_SCORE),
        (codes.B_LINE_PLEURA_PERCENT, 100.0 * f.b_line_fraction, codes.UNIT_PERCENT),
        (codes.B_LINE_COUNT, f.b_line_count, codes.UNIT_COUNT),
        (codes.B_LINE_ARTIFACT_SCORE, f.bla_score, codes.UNIT_SCORE),
    ]


def _cine_evaluations(f: VideoFindings) -> list[hd.sr.QualitativeEvaluation]:
    if not f.gradable:
        return _not_gradable(f.ungradable_reason)
    consolidation, effusion = segment(SegmentClass.CONSOLIDATION), segment(SegmentClass.EFFUSION)
    return [
        hd.sr.QualitativeEvaluation(consolidation.type, _present(f.consolidation)),
        hd.sr.QualitativeEvaluation(effusion.type, _present(f.effusion)),
        hd.sr.QualitativeEvaluation(codes.PLEURAL_LINE_IRREGULARITY, _present(f.pleura_irregular)),
    ]


def _frames_by_score(f: VideoFindings) -> list[tuple[int, list[int]]]:
    """(score, the 1-based frames that have it), by score."""
    frames_of: dict[int, list[int]] = {}
    for i, score in enumerate(f.frame_scores):
        frames_of.setdefault(int(score), []).append(i + 1)
    return sorted(frames_of.items())


def _areas(f: VideoFindings) -> dict[SegmentClass, float]:
    return {SegmentClass.CONSOLIDATION: f.consolidation_area_mm2, SegmentClass.EFFUSION: f.effusion_area_mm2}


# --- shape "viewer": one drawable group, the rest in the containers OHIF does not map -----------


def derived_measurements(report: _Report) -> list[hd.sr.Measurement]:
    """TID 1500 row 10 content: the cine NUMs, the per-frame scores and the segment areas."""
    f = report.findings
    out: list[hd.sr.Measurement] = []
    if f.gradable:
        out += [
            report.derived_num(name, value, unit, [report.cine()]) for name, value, unit in _cine_values(f)
        ]
        out += [
            report.derived_num(codes.FRAME_LUS_SCORE, score, codes.UNIT_SCORE, [report.cine(frames)])
            for score, frames in _frames_by_score(f)
        ]
    referenced = report.referenced_segments
    for cls, area in _areas(f).items():
        if cls not in report.present_segments:
            continue
        num = report.derived_num(codes.AREA, area, codes.UNIT_MM2, [report.cine()])
        content = num[0].ContentSequence
        # TID 300 row 2: the area is of this finding (post-coordinated concept modifier).
        content.insert(
            0,
            hd.sr.CodeContentItem(
                codes.FINDING,
                segment(cls).type,
                relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD,
            ),
        )
        if cls in referenced:
            content.append(report.segment_reference(cls))
        out.append(num)
    return out


def qualitative_evaluations(report: _Report) -> list[hd.sr.ContentItem]:
    """TID 1500 row 12 content: the cine's qualitative findings (or why it is not gradable) and
    one "Segmented in the cine" item per referenced SEG segment."""
    items: list[hd.sr.ContentItem] = [
        item for evaluation in _cine_evaluations(report.findings) for item in evaluation
    ]
    for cls in report.referenced_segments:
        item = hd.sr.CodeContentItem(codes.SEGMENTED, segment(cls).type, relationship_type=_CONTAINS)
        item.ContentSequence = hd.sr.ContentSequence([report.segment_reference(cls)])
        items.append(item)
    return items


def _container(name: Code, items: Sequence[hd.sr.ContentItem]) -> hd.sr.ContainerContentItem:
    container = hd.sr.ContainerContentItem(name=name, relationship_type=_CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence(list(items))
    return container


# --- shape "full": every finding in a measurement group ---------------------------------------


def _cine_group(report: _Report) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of the whole cine: its findings, or why it could not be graded."""
    f, src = report.findings, report.source
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(report.root, report.sop_uid, "LUS cine findings"),
        finding_type=codes.LUS_VIDEO_FINDINGS,
        algorithm_id=report.algorithm,
        finding_sites=report.sites,
        source_images=[hd.sr.SourceImageForMeasurementGroup(src.SOPClassUID, src.SOPInstanceUID)],
        measurements=[report.num(n, v, u) for n, v, u in _cine_values(f)] if f.gradable else None,
        qualitative_evaluations=_cine_evaluations(f),
    )


def _frame_scores_group(report: _Report) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group of the per-frame scores: one NUM per score present, listing its frames."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(report.root, report.sop_uid, "LUS per-frame scores"),
        finding_type=codes.LUS_FRAME_SCORES,
        algorithm_id=report.algorithm,
        finding_sites=report.sites,
        measurements=[
            report.num(
                codes.FRAME_LUS_SCORE, score, codes.UNIT_SCORE, referenced_images=[report.cine(frames)]
            )
            for score, frames in _frames_by_score(report.findings)
        ],
    )


def _segment_groups(report: _Report) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """TID 1411 groups referencing the SEG segments that have pixels (TID 1411 row 7)."""
    seg, src = report.seg, report.source
    areas = _areas(report.findings)
    groups = []
    for cls in report.referenced_segments:
        assert seg is not None
        row = segment(cls)
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=seg.SegmentSequence[int(cls) - 1].TrackingUID, identifier=f"lusai {row.label}"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=int(cls),
                    source_images=[hd.sr.SourceImageForSegmentation(src.SOPClassUID, src.SOPInstanceUID)],
                ),
                finding_type=row.type,
                algorithm_id=report.algorithm,
                finding_sites=report.sites,
                measurements=[report.num(codes.AREA, areas[cls], codes.UNIT_MM2)] if cls in areas else None,
            )
        )
    return groups


def segment_numbers_with_frames(seg: Dataset) -> set[int]:
    """Segment numbers that own at least one frame of ``seg`` (all of them for a LABELMAP)."""
    if seg.SegmentationType == "LABELMAP":
        return {int(s.SegmentNumber) for s in seg.SegmentSequence}
    return {
        int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        for g in seg.PerFrameFunctionalGroupsSequence
    }


def instance_identity(ds: Dataset) -> Dataset:
    """The UIDs highdicom needs to list ``ds`` as evidence (copying a whole SEG is slow)."""
    ident = Dataset()
    for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
        setattr(ident, kw, ds[kw].value)
    return ident


def build_report(
    source: Dataset,
    analysis: Analysis,
    sop_uid: str,
    root: str,
    seg: Dataset | None,
    *,
    shape: str = "viewer",
    source_meta: Dataset | None = None,
) -> hd.sr.MeasurementReport:
    """The TID 1500 content tree of ``shape`` (:data:`SR_SHAPES`, module docstring);
    ``source_meta``: :func:`metadata_copy` of ``source`` if the caller has one."""
    if shape not in SR_SHAPES:
        raise ValueError(f"unknown SR shape {shape!r}; one of {', '.join(SR_SHAPES)}")
    model = analysis.model
    report = _Report(
        source=source,
        analysis=analysis,
        sop_uid=sop_uid,
        root=root,
        seg=seg if seg is not None and seg.SegmentationType == "BINARY" else None,
        algorithm=hd.sr.AlgorithmIdentification(
            name=model.name,
            version=model.version,
            parameters=[f"{k}={v}" for k, v in algorithm_parameters(model).items()],
        ),
        sites=_finding_sites(source),
    )
    groups: list[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ] = [key_frame_group(report)]
    if shape == "full":
        groups.append(_cine_group(report))
        if report.findings.gradable:
            groups.append(_frame_scores_group(report))
        groups.extend(_segment_groups(report))
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model, root),
            name=model.name,
            manufacturer_name=MANUFACTURER,
            model_name=model.name,
            serial_number=model.package_sha256 or None,
        ),
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.DIAGNOSTIC_ULTRASONOGRAPHY,
        imaging_measurements=groups,
        referenced_images=[source_meta if source_meta is not None else metadata_copy(source)],
    )
    if shape == "viewer":
        containers = content[0].ContentSequence
        derived = derived_measurements(report)
        if derived:
            containers.append(
                _container(codes.DERIVED_IMAGING_MEASUREMENTS, [item for num in derived for item in num])
            )
        containers.append(_container(codes.QUALITATIVE_EVALUATIONS, qualitative_evaluations(report)))
    return content


def build_sr(
    source: Dataset,
    analysis: Analysis,
    series: SeriesInfo,
    *,
    seg: Dataset | None,
    uid_root: str,
    now: dt.datetime,
    shape: str = "viewer",
) -> hd.sr.Comprehensive3DSR:
    """The Measurement Report; ``seg`` (the SEG built for the same analysis) is referenced if given.

    ``shape``: ``"viewer"`` (default) - one measurement group, the key-frame region OHIF <= 3.13
    draws with the score beside it, and every other finding in TID 1500's Derived Imaging
    Measurements and Qualitative Evaluations containers, which OHIF does not read; ``"full"`` -
    every finding in its own measurement group (TID 1501/1411, the layout before issue 14),
    which OHIF <= 3.13 cannot open. Both carry the same findings (module docstring).
    """
    model = analysis.model
    source_meta = metadata_copy(source)
    report = build_report(
        source, analysis, series.sop_instance_uid, uid_root, seg, shape=shape, source_meta=source_meta
    )
    evidence = [source_meta] if seg is None else [source_meta, instance_identity(seg)]
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=series.series_instance_uid,
        series_number=series.series_number,
        sop_instance_uid=series.sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
    )
    copy_patient_study(source, sr)
    sr.SeriesDescription = series.series_description
    sr.ManufacturerModelName = model.name
    sr.SoftwareVersions = model.version
    sr.ContentDate = DA(now.strftime("%Y%m%d"))
    sr.ContentTime = TM(now.strftime("%H%M%S"))
    sr.InstanceCreationDate = sr.ContentDate
    sr.InstanceCreationTime = sr.ContentTime
    codes.declare_private_scheme(sr)
    return sr
