"""TID 1500 Measurement Report content (PS3.16), read back with highdicom, in both shapes.

``viewer`` (the default): one measurement group, the key frame, whose NUM carries the region OHIF
draws; the other findings in the Derived Imaging Measurements and Qualitative Evaluations
containers. ``full``: every finding in a measurement group. How OHIF reads them:
workers/write_dicom/sr.py and tests/workers/write_dicom/test_sr_ohif.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from service.core.segments import SEGMENT_CLASSES, SegmentClass, segment
from tests.factories import make_analysis, make_source
from tests.workers.write_dicom.conftest import NOW, outputs_for
from workers.domain import Analysis
from workers.write_dicom import OutputOptions, SegOptions
from workers.write_dicom import codes as c
from workers.write_dicom.common import SeriesInfo
from workers.write_dicom.conformance import check_output
from workers.write_dicom.sr import SR_SHAPES, build_sr, convex_hull, key_frame_region, pixel_hull

CONSOLIDATION = segment(SegmentClass.CONSOLIDATION).type.value
EFFUSION = segment(SegmentClass.EFFUSION).type.value
PLEURA = segment(SegmentClass.PLEURAL_LINE).type.value
MEASUREMENT_GROUP = "125007"
ALGORITHM_NAME = Code("111001", "DCM", "Algorithm Name")


def report_of(ds: Dataset) -> hd.sr.MeasurementReport:
    content = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


def code_of(concept: Any) -> str:
    assert concept is not None
    return str(concept.value)


def named(group: Any, code: Code) -> float:
    (m,) = group.get_measurements(name=code)
    return float(m.value)


def sr_with_shape(source: Dataset, analysis: Analysis, seg: Dataset | None, shape: str) -> Dataset:
    series = SeriesInfo("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", 9102, "LUSAI SR")
    return build_sr(
        source, analysis, series, seg=seg, uid_root="1.2.826.0.1.3680043.8.498.", now=NOW, shape=shape
    )


def container(report: hd.sr.MeasurementReport, name: Code) -> list[Any]:
    """The items of a TID 1500 top-level container (Derived Imaging Measurements, Qualitative
    Evaluations), as highdicom content items; [] when the report has none."""
    found = hd.sr.utils.find_content_items(report[0], name=name, value_type=hd.sr.ValueTypeValues.CONTAINER)
    return list(found[0].ContentSequence) if found else []


def derived(report: hd.sr.MeasurementReport) -> list[hd.sr.Measurement]:
    return [hd.sr.Measurement.from_sequence([i]) for i in container(report, c.DERIVED_IMAGING_MEASUREMENTS)]


def frames_of(images: list[Any]) -> list[int]:
    return [int(f) for r in images for f in np.atleast_1d(r.ReferencedSOPSequence[0].ReferencedFrameNumber)]


def segment_refs(items: list[Any]) -> list[int]:
    """Segment numbers the IMAGE items among ``items`` reference."""
    return [
        int(n)
        for i in items
        if i.value_type == hd.sr.ValueTypeValues.IMAGE
        and "ReferencedSegmentNumber" in i.ReferencedSOPSequence[0]
        for n in np.atleast_1d(i.ReferencedSOPSequence[0].ReferencedSegmentNumber)
    ]


def findings_of(ds: Dataset) -> dict[str, Any]:
    """What a machine reader finds in either shape, read with highdicom only."""
    report = report_of(ds)
    out: dict[str, Any] = {"frame_scores": {}, "areas": {}, "segments": set(), "evaluations": {}}
    (key,) = report.get_image_measurement_groups(finding_type=c.LUS_KEY_FRAME)
    out["algorithms"] = {i.value for i in key[0].ContentSequence if i.name == ALGORITHM_NAME}
    nums: list[tuple[Any, list[Any]]] = []  # (measurement, its own or its group's items)
    for group in report.get_image_measurement_groups():
        if code_of(group.finding_type) == c.LUS_KEY_FRAME.value:
            continue
        nums += [(m, list(group[0].ContentSequence)) for m in group.get_measurements()]
        for e in group.get_qualitative_evaluations():
            out["evaluations"][code_of(e.name)] = code_of(e.value)
    for group in report.get_volumetric_roi_measurement_groups():
        assert group.referenced_segment is not None
        (number,) = group.referenced_segment.referenced_segment_numbers or []
        out["segments"].add(int(number))
        for m in group.get_measurements(name=c.AREA):
            out["areas"][code_of(group.finding_type)] = (float(m.value), [int(number)])
    for m in derived(report):
        items = list(m[0].ContentSequence)
        if m.name == c.AREA:
            (finding,) = [i for i in items if i.name == c.FINDING]
            out["areas"][code_of(finding.value)] = (float(m.value), segment_refs(items))
        else:
            nums.append((m, items))
    for m, _ in nums:
        if m.name == c.FRAME_LUS_SCORE:
            for n in frames_of(list(m.referenced_images)):
                out["frame_scores"][n] = float(m.value)
        else:
            out[code_of(m.name)] = float(m.value)
    for item in container(report, c.QUALITATIVE_EVALUATIONS):
        if item.name == c.SEGMENTED:
            (number,) = segment_refs(list(item.ContentSequence))
            out["segments"].add(number)
        else:
            out["evaluations"][code_of(item.name)] = code_of(item.value)
    return out


@pytest.fixture(scope="module")
def built() -> tuple[Dataset, Analysis, dict[str, Dataset]]:
    source = make_source(350, 350, 5, jpeg=True)
    analysis = make_analysis(source, key_frame=3, score=2)
    out = outputs_for(source, analysis)
    out["SR full"] = sr_with_shape(source, analysis, out["SEG"], "full")
    return source, analysis, out


def test_report_header_and_context(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    source, _, out = built
    sr = hd.sr.Comprehensive3DSR.from_dataset(out["SR"])
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert (sr.StudyInstanceUID, sr.PatientID) == (source.StudyInstanceUID, source.PatientID)
    assert sr.SeriesDescription == "LUSAI SR" and sr.SoftwareVersions == "1.2.0"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    items = list(content_items(sr))
    concept = [(i.ConceptNameCodeSequence[0].CodeValue, i) for i in items]
    procedures = [i.ConceptCodeSequence[0].CodeValue for code, i in concept if code == "121058"]
    assert procedures == [c.DIAGNOSTIC_ULTRASONOGRAPHY.value]
    observer_types = [i.ConceptCodeSequence[0].CodeValue for code, i in concept if code == "121005"]
    assert observer_types == ["121007"]  # Device
    assert [i.TextValue for code, i in concept if code == "121013"] == ["lusai-unet"]
    evidence = {
        r.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for se in s.ReferencedSeriesSequence
        for r in se.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, out["SEG"].SOPInstanceUID}
    assert any(i.CodingSchemeDesignator == "99LUSAI" for i in sr.CodingSchemeIdentificationSequence)
    (library,) = [i for code, i in concept if code == "111028"]
    entry = library.ContentSequence[0].ContentSequence[0]
    assert entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    # TID 1500 row order: Image Library, Imaging Measurements, Derived, Qualitative Evaluations.
    top = [i.ConceptNameCodeSequence[0].CodeValue for i in sr.ContentSequence if i.ValueType == "CONTAINER"]
    assert top == ["111028", "126010", "126011", "C0034375"]


def group_regions(group: Dataset) -> list[Dataset]:
    """The SCOORDs OHIF takes a measurement's coordinates from: the group's own, else those
    under its NUMs (getSopClassHandlerModule.ts)."""
    own = [i for i in group.ContentSequence if i.ValueType in ("SCOORD", "SCOORD3D")]
    if own:
        return own[:1]
    return [
        child
        for i in group.ContentSequence
        if i.ValueType == "NUM"
        for child in i.get("ContentSequence", [])
        if child.ValueType == "SCOORD"
    ]


def test_every_measurement_group_carries_a_region_on_one_frame(
    built: tuple[Dataset, Analysis, dict[str, Dataset]],
) -> None:
    """The OHIF <= 3.13 constraint: every Measurement Group of Imaging Measurements (each one a
    measurement in OHIF) has a SCOORD, of its own or under a NUM, on one frame of the source."""
    source, analysis, out = built
    (imaging,) = [i for i in out["SR"].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"]
    groups = [
        i for i in imaging.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == MEASUREMENT_GROUP
    ]
    assert len(groups) == 1
    for group in groups:
        regions = group_regions(group)
        assert regions, "a measurement group without a SCOORD crashes OHIF <= 3.13"
        (ref,) = regions[0].ContentSequence[0].ReferencedSOPSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert ref["ReferencedFrameNumber"].VM == 1
        assert int(ref.ReferencedFrameNumber) == analysis.findings.key_frame + 1
        assert regions[0].GraphicType == "POLYLINE"  # closed: DICOMSRDisplayTool draws no POLYGON
    # The "full" shape is the one OHIF <= 3.13 cannot open: groups without any coordinate.
    (imaging,) = [
        i for i in out["SR full"].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    assert any(not group_regions(g) for g in imaging.ContentSequence)


def test_key_frame_region_is_the_scored_pleura(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    source, analysis, out = built
    (group,) = report_of(out["SR"]).get_image_measurement_groups(finding_type=c.LUS_KEY_FRAME)
    assert group.tracking_uid and group.tracking_identifier == "LUS score key frame"
    (score,) = group.get_measurements(name=c.LUS_SCORE)
    assert score.value == 2.0
    (region,) = score.referenced_coordinates
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    polygon = region.value
    assert np.array_equal(polygon[0], polygon[-1])  # closed
    rows, cols = np.nonzero(analysis.labels[3] == SegmentClass.PLEURAL_LINE)
    assert polygon[:, 0].min() == cols.min() and polygon[:, 0].max() == cols.max() + 1
    assert polygon[:, 1].min() == rows.min() and polygon[:, 1].max() == rows.max() + 1
    assert polygon_area(polygon) < 0.05 * source.Rows * source.Columns  # not the whole image
    evaluations = {code_of(e.name): code_of(e.value) for e in group.get_qualitative_evaluations()}
    assert evaluations == {c.KEY_FRAME_REGION.value: PLEURA}


def polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0].astype(float), polygon[:, 1].astype(float)
    return abs(float(np.dot(x[:-1], y[1:]) - np.dot(x[1:], y[:-1]))) / 2


def inside(polygon: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Points (x, y) inside or on the closed convex ``polygon``."""
    a, b = polygon[:-1], polygon[1:]
    cross = (b[:, 0] - a[:, 0])[:, None] * (y - a[:, 1][:, None]) - (b[:, 1] - a[:, 1])[:, None] * (
        x - a[:, 0][:, None]
    )
    return np.asarray((cross >= 0).all(axis=0) | (cross <= 0).all(axis=0))


def test_region_hugs_a_curved_pleura() -> None:
    """A curved pleural line: a convex polygon with more than four corners, every pleura pixel
    inside it, and all of it within the pleura's bounding box."""
    source = make_source(120, 160, 3, jpeg=False)
    analysis = make_analysis(source, key_frame=1)
    labels = analysis.labels.copy()
    labels[labels == SegmentClass.PLEURAL_LINE] = 0
    xs = np.arange(20, 140)
    top = (30 + ((xs - 80) / 12.0) ** 2).astype(int)  # a parabola, 30 rows at its apex
    for x, y in zip(xs, top, strict=True):
        labels[1, y : y + 3, x] = SegmentClass.PLEURAL_LINE
    region = key_frame_region(dataclasses.replace(analysis, labels=labels), source)
    assert region.basis == segment(SegmentClass.PLEURAL_LINE).type and region.frame == 2
    polygon = region.polygon
    assert len(polygon) > 5 and np.array_equal(polygon[0], polygon[-1])
    rows, cols = np.nonzero(labels[1] == SegmentClass.PLEURAL_LINE)
    assert inside(polygon, cols + 0.5, rows + 0.5).all()  # pixel centres
    assert polygon[:, 0].min() == cols.min() and polygon[:, 0].max() == cols.max() + 1
    assert polygon[:, 1].min() == rows.min() and polygon[:, 1].max() == rows.max() + 1


def test_region_falls_back_to_b_lines_then_the_ultrasound_region() -> None:
    source = make_source(120, 160, 3, jpeg=False)
    analysis = make_analysis(source, key_frame=1)
    labels = analysis.labels.copy()
    labels[1][labels[1] == SegmentClass.PLEURAL_LINE] = 0
    region = key_frame_region(dataclasses.replace(analysis, labels=labels), source)
    assert region.basis == segment(SegmentClass.B_LINE).type
    _, cols = np.nonzero(labels[1] == SegmentClass.B_LINE)
    assert (region.polygon[:, 0].min(), region.polygon[:, 0].max()) == (cols.min(), cols.max() + 1)

    labels[1][labels[1] == SegmentClass.B_LINE] = 0
    no_lines = dataclasses.replace(analysis, labels=labels)
    region = key_frame_region(no_lines, source)
    us = source.SequenceOfUltrasoundRegions[0]
    assert region.basis == c.ULTRASOUND_REGION
    assert (region.polygon[0, 0], region.polygon[0, 1]) == (us.RegionLocationMinX0, us.RegionLocationMinY0)
    assert (region.polygon[2, 0], region.polygon[2, 1]) == (
        us.RegionLocationMaxX1 + 1,
        us.RegionLocationMaxY1 + 1,
    )

    del source.SequenceOfUltrasoundRegions
    region = key_frame_region(no_lines, source)
    assert region.basis == c.WHOLE_IMAGE and region.polygon.max(axis=0).tolist() == [160, 120]

    # ... and the group says so where OHIF shows it.
    sr = sr_with_shape(source, no_lines, None, "viewer")
    comments = [i.TextValue for i in content_items(sr) if i.ConceptNameCodeSequence[0].CodeValue == "121106"]
    assert comments == ["LUS score 2", "Region: whole image (no pleural line or B-lines on this frame)"]


def test_pixel_hull_and_convex_hull() -> None:
    assert pixel_hull(np.zeros((4, 4), bool)) is None
    one = np.zeros((4, 4), bool)
    one[1, 2] = True
    assert pixel_hull(one).tolist() == [[2, 1], [3, 1], [3, 2], [2, 2], [2, 1]]  # type: ignore[union-attr]
    assert convex_hull(np.array([[0, 0], [2, 0], [1, 0], [2, 2], [0, 2], [1, 1]])) == [
        (0, 0),
        (2, 0),
        (2, 2),
        (0, 2),
    ]


@pytest.mark.parametrize("score", [0, 2])
def test_the_text_beside_the_region_is_the_result(score: int) -> None:
    """OHIF prints a group's Comment TEXT items, then its NUMs with two decimals - and a 0 as
    nothing, so the Comment carries the score too."""
    source = make_source(64, 80, 3, jpeg=False)
    sr = sr_with_shape(source, make_analysis(source, key_frame=1, score=score), None, "viewer")
    (group,) = report_of(sr).get_image_measurement_groups(finding_type=c.LUS_KEY_FRAME)
    comments = [i.value for i in group[0].ContentSequence if i.name == c.COMMENT]
    assert comments == [f"LUS score {score}"]  # the region is around the pleura: no second line
    assert named(group, c.LUS_SCORE) == score


def test_content_is_complete(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    """Everything the report states, found by a machine reader (highdicom), in the default shape."""
    source, analysis, out = built
    found = findings_of(out["SR"])
    assert found[c.LUS_SCORE.value] == analysis.findings.score == 2
    assert found[c.B_LINE_PLEURA_PERCENT.value] == pytest.approx(12.5)
    assert found[c.B_LINE_COUNT.value] == 3 and found[c.B_LINE_ARTIFACT_SCORE.value] == 1.5
    assert found["frame_scores"] == {i + 1: float(s) for i, s in enumerate(analysis.findings.frame_scores)}
    assert found["evaluations"] == {
        CONSOLIDATION: c.PRESENT.value,
        EFFUSION: c.ABSENT.value,
        c.PLEURAL_LINE_IRREGULARITY.value: c.ABSENT.value,
    }
    assert found["areas"] == {CONSOLIDATION: (12.5, [int(SegmentClass.CONSOLIDATION)])}
    present = {int(k) for k in SEGMENT_CLASSES if (analysis.labels == k).any()}
    assert found["segments"] == present
    assert found["algorithms"] == {"lusai-unet"}
    # Every derived NUM names its algorithm, finding site and source images itself.
    report = report_of(out["SR"])
    for m in derived(report):
        names = [i.name for i in m[0].ContentSequence]
        assert ALGORITHM_NAME in names
        assert code_of(m.finding_sites[0].value) == c.LUNG.value
        assert (
            m.referenced_images[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        )
    seg_refs = [
        i
        for i in content_items(out["SR"])
        if "ReferencedSegmentNumber" in i.get("ReferencedSOPSequence", [{}])[0]
    ]
    assert {r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for r in seg_refs} == {
        out["SEG"].SOPInstanceUID
    }


def test_both_shapes_carry_the_same_findings(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    _, _, out = built
    assert findings_of(out["SR full"]) == findings_of(out["SR"])


def test_full_shape_has_a_group_per_finding(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    source, analysis, out = built
    report = report_of(out["SR full"])
    groups = {code_of(g.finding_type): g for g in report.get_image_measurement_groups()}
    assert set(groups) == {c.LUS_KEY_FRAME.value, c.LUS_VIDEO_FINDINGS.value, c.LUS_FRAME_SCORES.value}
    assert named(groups[c.LUS_VIDEO_FINDINGS.value], c.LUS_SCORE) == 2
    measurements = groups[c.LUS_FRAME_SCORES.value].get_measurements(name=c.FRAME_LUS_SCORE)
    assert [m.value for m in measurements] == sorted(set(analysis.findings.frame_scores))  # one per score
    seg = out["SEG"]
    volumetric = report.get_volumetric_roi_measurement_groups()
    present = [int(k) for k in SEGMENT_CLASSES if (analysis.labels == k).any()]
    refs = [g.referenced_segment for g in volumetric]
    assert [list(r.referenced_segment_numbers or []) for r in refs if r is not None] == [[n] for n in present]
    for g, n in zip(volumetric, present, strict=True):
        assert g.tracking_uid == seg.SegmentSequence[n - 1].TrackingUID
    assert container(report, c.DERIVED_IMAGING_MEASUREMENTS) == []
    assert container(report, c.QUALITATIVE_EVALUATIONS) == []
    assert check_output(source, encode(out["SR full"])) == []


def encode(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("shape", SR_SHAPES)
def test_ohif_safety_rules(built: tuple[Dataset, Analysis, dict[str, Dataset]], shape: str) -> None:
    """Every NUM has a value and unit; every measurement group has one unique tracking UID and the
    algorithm identification; the observer's serial number is the package."""
    _, analysis, out = built
    sr = out["SR"] if shape == "viewer" else out["SR full"]
    items = list(content_items(sr))
    nums = [i for i in items if i.ValueType == "NUM"]
    assert len(nums) >= 5 + len(set(analysis.findings.frame_scores))
    for num in nums:
        assert len(num.MeasuredValueSequence) == 1
        assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence
    containers = [
        i
        for i in items
        if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == MEASUREMENT_GROUP
    ]
    tracking = []
    for group in containers:
        uids = [i.UID for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040"]
        assert len(uids) == 1
        tracking.extend(uids)
        algorithm = [i for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111001"]
        assert [i.TextValue for i in algorithm] == ["lusai-unet"]
    assert len(tracking) == len(set(tracking)) == len(containers)
    params = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert f"weights_sha256={'ab' * 32}" in params and f"package_sha256={'cd' * 32}" in params
    devices = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121016"]
    assert devices == ["cd" * 32]  # Device Serial Number of the observer: the package


def test_labelmap_seg_is_not_referenced_by_segment() -> None:
    """dciodvfy refuses ReferencedSegmentNumber for a LABELMAP SEG: no segment reference, the
    areas stay."""
    source = make_source(64, 64, 2, jpeg=False)
    analysis = make_analysis(source)
    out = outputs_for(source, analysis, OutputOptions(seg=SegOptions(segmentation_type="LABELMAP")))
    found = findings_of(out["SR"])
    assert found["segments"] == set() and found["areas"] == {CONSOLIDATION: (12.5, [])}
    full = findings_of(sr_with_shape(source, analysis, out["SEG"], "full"))
    assert full["segments"] == set() and full["areas"] == {}


@pytest.mark.parametrize("shape", SR_SHAPES)
def test_the_report_does_not_grow_with_the_cine(shape: str) -> None:
    """Per-frame scores are one NUM per score value listing its frames: a 120-frame cine's SR has
    as many content items as a 6-frame one's (one NUM per frame made long cines slow to write)."""
    sizes = []
    for n in (6, 120):
        source = make_source(64, 80, n, jpeg=False)
        sr = sr_with_shape(source, make_analysis(source), None, shape)
        sizes.append(sum(1 for _ in content_items(sr)))
        assert sorted(findings_of(sr)["frame_scores"]) == list(range(1, n + 1))  # every frame, once
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("shape", SR_SHAPES)
def test_same_inputs_give_the_same_report(
    built: tuple[Dataset, Analysis, dict[str, Dataset]], shape: str
) -> None:
    """Deterministic: the same UIDs (tracking UIDs included) and content tree on every build
    (only highdicom's ContributionDateTime says when)."""
    source, analysis, out = built
    first, again = (sr_with_shape(source, analysis, out["SEG"], shape) for _ in range(2))
    uids = [[i.UID for i in content_items(ds) if i.ValueType == "UIDREF"] for ds in (first, again)]
    assert uids[0] == uids[1] and len(uids[0]) >= 2
    assert first.ContentSequence == again.ContentSequence


def test_unknown_shape_is_refused() -> None:
    source = make_source(32, 32, 3, jpeg=False)
    with pytest.raises(ValueError, match="unknown SR shape 'ohif'"):
        sr_with_shape(source, make_analysis(source), None, "ohif")
