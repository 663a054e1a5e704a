"""TID 1500 Measurement Report content (PS3.16), read back with highdicom."""

from __future__ import annotations

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
from tests.workers.write_dicom.conftest import outputs_for
from workers.domain import Analysis
from workers.write_dicom import OutputOptions, SegOptions
from workers.write_dicom import codes as c

CONSOLIDATION = segment(SegmentClass.CONSOLIDATION).type.value
EFFUSION = segment(SegmentClass.EFFUSION).type.value


def report_of(ds: Dataset) -> hd.sr.MeasurementReport:
    content = hd.sr.Comprehensive3DSR.from_dataset(ds).content
    assert isinstance(content, hd.sr.MeasurementReport)
    return content


def content_items(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from content_items(item)


@pytest.fixture(scope="module")
def built() -> tuple[Dataset, Analysis, dict[str, Dataset]]:
    source = make_source(350, 350, 5, jpeg=True)
    analysis = make_analysis(source, key_frame=3, score=2)
    return source, analysis, outputs_for(source, analysis)


def code_of(concept: Any) -> str:
    assert concept is not None
    return str(concept.value)


def named(group: Any, code: Code) -> float:
    (m,) = group.get_measurements(name=code)
    return float(m.value)


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


def test_key_frame_scoord_carries_the_score(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    source, analysis, out = built
    report = report_of(out["SR"])
    (group,) = report.get_planar_roi_measurement_groups()
    assert group.tracking_uid and code_of(group.finding_type) == c.LUS_KEY_FRAME.value
    region = group.roi
    assert isinstance(region, hd.sr.ImageRegion)
    assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    ref = region.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert int(ref.ReferencedFrameNumber) == analysis.findings.key_frame + 1 == 4
    data = region.value
    assert np.array_equal(data[0], data[-1]) and len(data) == 5  # closed rectangle
    labelled = np.argwhere(np.isin(analysis.labels[3], [1, 3, 4, 5]))
    assert data[:, 0].min() == labelled[:, 1].min() and data[:, 1].min() == labelled[:, 0].min()
    assert named(group, c.LUS_SCORE) == 2.0


def test_video_and_frame_groups(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    source, analysis, out = built
    report = report_of(out["SR"])
    groups = {code_of(g.finding_type): g for g in report.get_image_measurement_groups()}
    video = groups[c.LUS_VIDEO_FINDINGS.value]
    assert named(video, c.LUS_SCORE) == analysis.findings.score
    assert named(video, c.B_LINE_PLEURA_PERCENT) == pytest.approx(12.5)
    assert named(video, c.B_LINE_COUNT) == 3
    evaluations = {code_of(e.name): code_of(e.value) for e in video.get_qualitative_evaluations()}
    assert evaluations[CONSOLIDATION] == c.PRESENT.value
    assert evaluations[EFFUSION] == c.ABSENT.value
    assert video.finding_sites[0].value.value == c.LUNG.value
    frames = groups[c.LUS_FRAME_SCORES.value]
    measurements = frames.get_measurements(name=c.FRAME_LUS_SCORE)
    assert [m.value for m in measurements] == sorted(set(analysis.findings.frame_scores))  # one per score
    refs = [m.referenced_images[0].ReferencedSOPSequence[0] for m in measurements]
    score_of_frame = {
        int(n): m.value
        for m, r in zip(measurements, refs, strict=True)
        for n in (r.ReferencedFrameNumber if r["ReferencedFrameNumber"].VM > 1 else [r.ReferencedFrameNumber])
    }
    assert [score_of_frame[n] for n in range(1, 6)] == list(analysis.findings.frame_scores)
    assert {r.ReferencedSOPInstanceUID for r in refs} == {source.SOPInstanceUID}


def test_segment_groups_reference_seg(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    _, analysis, out = built
    seg = out["SEG"]
    report = report_of(out["SR"])
    groups = report.get_volumetric_roi_measurement_groups()
    present = [int(k) for k in SEGMENT_CLASSES if (analysis.labels == k).any()]
    refs = [g.referenced_segment for g in groups]
    numbers = [list(r.referenced_segment_numbers or []) for r in refs if r is not None]
    assert numbers == [[n] for n in present]
    for g, ref, (number,) in zip(groups, refs, numbers, strict=True):
        assert ref is not None and ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert g.tracking_uid == seg.SegmentSequence[number - 1].TrackingUID
    consolidation = next(g for g in groups if code_of(g.finding_type) == CONSOLIDATION)
    assert named(consolidation, c.AREA) == pytest.approx(12.5)


def test_ohif_safety_rules(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    """Every NUM has a value and unit; every measurement group has a unique tracking UID."""
    _, analysis, out = built
    items = list(content_items(out["SR"]))
    nums = [i for i in items if i.ValueType == "NUM"]
    assert len(nums) >= 5 + len(analysis.findings.frame_scores)
    for num in nums:
        assert len(num.MeasuredValueSequence) == 1
        assert num.MeasuredValueSequence[0].MeasurementUnitsCodeSequence
    containers = [
        i for i in items if i.ValueType == "CONTAINER" and i.ConceptNameCodeSequence[0].CodeValue == "125007"
    ]
    tracking = []
    for group in containers:
        uids = [i.UID for i in group.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "112040"]
        assert len(uids) == 1
        tracking.extend(uids)
    assert len(tracking) == len(set(tracking)) == len(containers)
    algos = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "111001"]
    params = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "111002"]
    assert set(algos) == {"lusai-unet"} and f"weights_sha256={'ab' * 32}" in params
    assert f"package_sha256={'cd' * 32}" in params  # the model package in every measurement group
    devices = [i.TextValue for i in items if i.ConceptNameCodeSequence[0].CodeValue == "121016"]
    assert devices == ["cd" * 32]  # Device Serial Number of the observer: the package


def test_labelmap_seg_is_not_referenced_by_segment() -> None:
    source = make_source(64, 64, 2, jpeg=False)
    analysis = make_analysis(source)
    out = outputs_for(source, analysis, OutputOptions(seg=SegOptions(segmentation_type="LABELMAP")))
    report = report_of(out["SR"])
    assert report.get_volumetric_roi_measurement_groups() == []
    assert len(report.get_planar_roi_measurement_groups()) == 1


def test_the_report_does_not_grow_with_the_cine() -> None:
    """Per-frame scores are one NUM per score value listing its frames: a 120-frame cine's SR has
    as many content items as a 6-frame one's (one NUM per frame made long cines slow to write)."""
    sizes = []
    for n in (6, 120):
        source = make_source(64, 80, n, jpeg=False)
        sr = outputs_for(source, make_analysis(source))["SR"]
        sizes.append(sum(1 for _ in content_items(sr)))
        frames = report_of(sr).get_image_measurement_groups(finding_type=c.LUS_FRAME_SCORES)[0]
        listed = [
            int(f)
            for m in frames.get_measurements(name=c.FRAME_LUS_SCORE)
            for f in np.atleast_1d(m.referenced_images[0].ReferencedSOPSequence[0].ReferencedFrameNumber)
        ]
        assert sorted(listed) == list(range(1, n + 1))  # every frame has exactly one score
    assert sizes[0] == sizes[1]
