"""TID 1500 Measurement Report (PS3.16) of the LUS findings, as a Comprehensive 3D SR (A.35.13).

Content tree (all groups carry a Tracking Identifier and UID, every NUM carries a value):

* observation context: the algorithm as device observer (TID 1004);
* procedure reported: SCT 16310003 "Diagnostic ultrasonography"; Image Library (TID 1600) with
  the source cine;
* TID 1410 planar ROI on the key frame (the frame that decided the score): a closed POLYLINE
  SCOORD around the scored pleura with the LUS score, so OHIF (which only displays groups with
  spatial coordinates) shows the result on the image;
* TID 1501 video-level group: LUS score, % of pleural line with B-lines, B-line count, B-line
  artifact score, consolidation / effusion / pleural irregularity present or absent, finding
  site lung with laterality;
* TID 1501 per-frame scores: one NUM per score present, referencing every frame with that score
  (at most four NUMs whatever the cine's length: one NUM per frame made the SR of a 1,000-frame
  cine ~7,000 content items and most of the cost of writing it);
* TID 1411 volumetric ROI groups referencing each non-empty SEG segment (with areas where the
  findings provide them).

A cine that is not gradable has no score anywhere: the key-frame and video groups carry the
quality assessment "Unusable" and the coded reason instead of the score and the B-line
measurements (a guess on an unusable image), and there is no per-frame group. The segment
groups stay, like the SEG.

Every measurement group carries the algorithm identification (TID 4019) with the weights and model
package hashes; the device observer's serial number is the package hash.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

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

#: Classes whose pixels delimit the scored region on the key frame.
_SCORED_CLASSES = (
    SegmentClass.PLEURAL_LINE,
    SegmentClass.B_LINE,
    SegmentClass.CONSOLIDATION,
    SegmentClass.EFFUSION,
)


def key_frame_polyline(analysis: Analysis, source: Dataset) -> np.ndarray:
    """Closed rectangle (column, row) around the scored classes on the key frame.

    Falls back to the ultrasound region, then to the whole image, when the key frame has none.
    """
    frame = np.asarray(analysis.labels[analysis.findings.key_frame])
    rows, cols = np.nonzero(np.isin(frame, [int(c) for c in _SCORED_CLASSES]))
    if rows.size:
        x0, y0, x1, y1 = int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())
    elif (region := ultrasound_region(source)) is not None:
        x0, y0, x1, y1 = region.x0, region.y0, region.x1, region.y1
    else:
        x0, y0, x1, y1 = 0, 0, int(source.Columns) - 1, int(source.Rows) - 1
    # Pixel centres are at integer + 0.5 in SCOORD image coordinates (C.18.6.1.1).
    left, top, right, bottom = x0, y0, x1 + 1.0, y1 + 1.0
    return np.array(
        [[left, top], [right, top], [right, bottom], [left, bottom], [left, top]], dtype=np.float32
    )


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


def _num(name: Code, value: float, unit: Code, **kw: object) -> hd.sr.Measurement:
    """A NUM without its own algorithm identification: its measurement group carries it (TID
    1501/1410/1411 row "Algorithm Identification"), and repeating it in every NUM was 20% of the
    report's content items."""
    return hd.sr.Measurement(name=name, value=float(value), unit=unit, **kw)  # type: ignore[arg-type]


def _tracking(root: str, sop_uid: str, label: str) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=derive_uid(root, sop_uid, "tracking", label), identifier=label)


def build_measurement_groups(
    source: Dataset, analysis: Analysis, sop_uid: str, root: str, seg: Dataset | None
) -> list[
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
]:
    f = analysis.findings
    model = analysis.model
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"{k}={v}" for k, v in algorithm_parameters(model).items()],
    )
    sites = _finding_sites(source)
    sop_class, src_uid = source.SOPClassUID, source.SOPInstanceUID
    groups: list[
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []

    key_score = [_num(codes.LUS_SCORE, f.score, codes.UNIT_SCORE)] if f.gradable else None
    key_ref = hd.sr.SourceImageForRegion(sop_class, src_uid, [f.key_frame + 1])
    groups.append(
        hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(root, sop_uid, "LUS score key frame"),
            referenced_region=hd.sr.ImageRegion(
                graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                graphic_data=key_frame_polyline(analysis, source),
                source_image=key_ref,
            ),
            finding_type=codes.LUS_KEY_FRAME,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=key_score,
            qualitative_evaluations=None if f.gradable else _not_gradable(f.ungradable_reason),
        )
    )
    if f.gradable:
        groups.extend(_score_groups(f, root, sop_uid, sop_class, src_uid, algorithm, sites))
    else:
        groups.append(
            _cine_findings(
                root,
                sop_uid,
                sop_class,
                src_uid,
                algorithm,
                sites,
                qualitative=_not_gradable(f.ungradable_reason),
            )
        )

    # dciodvfy (2026-09) rejects ReferencedSegmentNumber for the Label Map Segmentation SOP class
    # in SR references, so segments are referenced from BINARY SEGs only.
    if seg is not None and seg.SegmentationType == "BINARY":
        groups.extend(_segment_groups(source, analysis, seg, sop_uid, root, algorithm, sites))
    return groups


def _cine_findings(
    root: str,
    sop_uid: str,
    sop_class: str,
    src_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    sites: Sequence[hd.sr.FindingSite],
    *,
    measurements: Sequence[hd.sr.Measurement] | None = None,
    qualitative: Sequence[hd.sr.QualitativeEvaluation] | None = None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of the whole cine: its findings, or why it could not be graded."""
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=_tracking(root, sop_uid, "LUS cine findings"),
        finding_type=codes.LUS_VIDEO_FINDINGS,
        algorithm_id=algorithm,
        finding_sites=sites,
        source_images=[hd.sr.SourceImageForMeasurementGroup(sop_class, src_uid)],
        measurements=measurements,
        qualitative_evaluations=qualitative,
    )


def _score_groups(
    f: VideoFindings,
    root: str,
    sop_uid: str,
    sop_class: str,
    src_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
    sites: Sequence[hd.sr.FindingSite],
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """TID 1501 video-level findings and per-frame scores of a gradable cine."""
    consolidation, effusion = segment(SegmentClass.CONSOLIDATION), segment(SegmentClass.EFFUSION)
    groups: list[hd.sr.MeasurementsAndQualitativeEvaluations] = []
    groups.append(
        _cine_findings(
            root,
            sop_uid,
            sop_class,
            src_uid,
            algorithm,
            sites,
            measurements=[
                _num(codes.LUS_SCORE, f.score, codes.UNIT_SCORE),
                _num(codes.B_LINE_PLEURA_PERCENT, 100.0 * f.b_line_fraction, codes.UNIT_PERCENT),
                _num(codes.B_LINE_COUNT, f.b_line_count, codes.UNIT_COUNT),
                _num(codes.B_LINE_ARTIFACT_SCORE, f.bla_score, codes.UNIT_SCORE),
            ],
            qualitative=[
                hd.sr.QualitativeEvaluation(consolidation.type, _present(f.consolidation)),
                hd.sr.QualitativeEvaluation(effusion.type, _present(f.effusion)),
                hd.sr.QualitativeEvaluation(codes.PLEURAL_LINE_IRREGULARITY, _present(f.pleura_irregular)),
            ],
        )
    )

    frames_of: dict[int, list[int]] = {}  # score -> the (1-based) frames that have it
    for i, score in enumerate(f.frame_scores):
        frames_of.setdefault(int(score), []).append(i + 1)
    groups.append(
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(root, sop_uid, "LUS per-frame scores"),
            finding_type=codes.LUS_FRAME_SCORES,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=[
                _num(
                    codes.FRAME_LUS_SCORE,
                    score,
                    codes.UNIT_SCORE,
                    referenced_images=[hd.sr.SourceImageForMeasurement(sop_class, src_uid, frames)],
                )
                for score, frames in sorted(frames_of.items())
            ],
        )
    )
    return groups


def _segment_groups(
    source: Dataset,
    analysis: Analysis,
    seg: Dataset,
    sop_uid: str,
    root: str,
    algorithm: hd.sr.AlgorithmIdentification,
    sites: Sequence[hd.sr.FindingSite],
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations]:
    """TID 1411 groups referencing the SEG segments that have pixels (TID 1411 row 7)."""
    with_frames = segment_numbers_with_frames(seg)
    areas = {
        SegmentClass.CONSOLIDATION: analysis.findings.consolidation_area_mm2,
        SegmentClass.EFFUSION: analysis.findings.effusion_area_mm2,
    }
    groups = []
    for cls in SEGMENT_CLASSES:
        if int(cls) not in with_frames or not analysis.class_frames[:, int(cls)].any():
            continue
        row = segment(cls)
        measurements = []
        if cls in areas:
            measurements.append(_num(codes.AREA, areas[cls], codes.UNIT_MM2))
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=seg.SegmentSequence[int(cls) - 1].TrackingUID, identifier=f"lusai {row.label}"
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=int(cls),
                    source_images=[
                        hd.sr.SourceImageForSegmentation(source.SOPClassUID, source.SOPInstanceUID)
                    ],
                ),
                finding_type=row.type,
                algorithm_id=algorithm,
                finding_sites=sites,
                measurements=measurements or None,
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


def build_sr(
    source: Dataset,
    analysis: Analysis,
    series: SeriesInfo,
    *,
    seg: Dataset | None,
    uid_root: str,
    now: dt.datetime,
) -> hd.sr.Comprehensive3DSR:
    """The Measurement Report; ``seg`` (the SEG built for the same analysis) is referenced if given."""
    model = analysis.model
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(model, uid_root),
            name=model.name,
            manufacturer_name=MANUFACTURER,
            model_name=model.name,
            serial_number=model.package_sha256 or None,
        ),
    )
    source_meta = metadata_copy(source)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.DIAGNOSTIC_ULTRASONOGRAPHY,
        imaging_measurements=build_measurement_groups(
            source, analysis, series.sop_instance_uid, uid_root, seg
        ),
        referenced_images=[source_meta],
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
