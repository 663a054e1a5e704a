"""SEG content, read back with highdicom and pydicom (PS3.3 A.51, C.8.20)."""

from __future__ import annotations

import io

import highdicom as hd
import numpy as np
import pydicom
import pytest

from service.core.dicom import OutputKind
from service.core.segments import SEGMENT_CLASSES, SegmentClass
from tests.factories import make_analysis, make_source
from tests.workers.write_dicom.conftest import N_FRAMES, NOW, outputs_for
from workers.domain import Analysis
from workers.write_dicom import OutputOptions, SegOptions
from workers.write_dicom.build import series_info
from workers.write_dicom.seg import WEASIS_MAX_FRAMES, build_seg, selected_source_frames


def roundtrip(ds: pydicom.Dataset) -> pydicom.Dataset:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf)


def seg_of(
    source: pydicom.Dataset, analysis: Analysis, options: SegOptions = SegOptions()
) -> pydicom.Dataset:
    opts = OutputOptions()
    info = series_info(source, analysis, OutputKind.SEG, opts)
    return roundtrip(build_seg(source, analysis, info, options=options, uid_root=opts.uid_root, now=NOW))


def present_classes(labels: np.ndarray) -> list[SegmentClass]:
    return [c for c in SEGMENT_CLASSES if (labels == c).any()]


def test_binary_pixels_equal_input_masks(case: tuple[pydicom.Dataset, Analysis]) -> None:
    source, analysis = case
    seg = hd.seg.Segmentation.from_dataset(seg_of(source, analysis))
    present = present_classes(analysis.labels)
    assert SegmentClass.EFFUSION not in present  # the fixture has no effusion: an omitted segment
    arr = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID,
        source_frame_numbers=list(range(1, N_FRAMES + 1)),
        segment_numbers=[int(c) for c in present],
    )
    assert arr.shape == (N_FRAMES, source.Rows, source.Columns, len(present))
    for i, cls in enumerate(present):
        np.testing.assert_array_equal(arr[..., i], analysis.labels == cls)


def test_segments_frames_and_references(case: tuple[pydicom.Dataset, Analysis]) -> None:
    source, analysis = case
    ds = seg_of(source, analysis)
    present = present_classes(analysis.labels)
    assert ds.SOPClassUID == pydicom.uid.SegmentationStorage
    assert ds.StudyInstanceUID == source.StudyInstanceUID and ds.PatientID == source.PatientID
    assert ds.SeriesInstanceUID != source.SeriesInstanceUID and ds.SeriesDescription == "LUSAI SEG"
    assert (ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions) == (
        "lusai",
        "lusai-unet",
        "1.2.0",
    )
    assert ds.PatientOrientation == source.PatientOrientation
    assert ds.LossyImageCompression == source.LossyImageCompression  # "01" stays "01" (C.7.6.1.1.5)
    expected = [(int(c), f + 1) for c in present for f in range(N_FRAMES) if (analysis.labels[f] == c).any()]
    assert len(expected) < len(present) * N_FRAMES  # consolidation on every other frame: no empty frames
    assert ds.NumberOfFrames == len(expected)
    assert [int(s.SegmentNumber) for s in ds.SegmentSequence] == [int(c) for c in SEGMENT_CLASSES]
    for item in ds.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algo = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("lusai-unet", "1.2.0")
        assert f"package_sha256={'cd' * 32}" in algo.AlgorithmParameters
        assert "RecommendedDisplayCIELabValue" in item and "TrackingUID" in item
        region = item.AnatomicRegionSequence[0]
        assert region.CodeValue == "39607008"
        assert region.AnatomicRegionModifierSequence[0].CodeValue == "24028007"  # source Laterality R
    types = {int(s.SegmentNumber): s.SegmentedPropertyTypeCodeSequence[0] for s in ds.SegmentSequence}
    assert (types[1].CodeValue, types[1].CodingSchemeDesignator) == ("3120008", "SCT")
    assert (types[3].CodeValue, types[3].CodingSchemeDesignator) == ("BLINE", "99LUSAI")
    assert types[5].CodeValue == "60046008" and types[6].CodeValue == "113197003"
    assert any(i.CodingSchemeDesignator == "99LUSAI" for i in ds.CodingSchemeIdentificationSequence)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    seen = []
    for group in ds.PerFrameFunctionalGroupsSequence:
        src = group.DerivationImageSequence[0].SourceImageSequence[0]
        assert src.ReferencedSOPInstanceUID == source.SOPInstanceUID
        segment = int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        frame = int(src.ReferencedFrameNumber)
        assert list(group.FrameContentSequence[0].DimensionIndexValues) == [segment, frame]
        assert "PlanePositionSequence" not in group
        seen.append((segment, frame))
    assert seen == expected
    shared = ds.SharedFunctionalGroupsSequence[0]
    assert [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing] == pytest.approx([0.3, 0.25])
    assert list(shared.PlaneOrientationSequence[0].ImageOrientationPatient) == [1, 0, 0, 0, 1, 0]


def test_bit_packing_is_contiguous_across_frames() -> None:
    """350 x 350 = 122500 bits per frame: frame 2 starts mid-byte (PS3.5 8.1.1)."""
    source = make_source(350, 350, 3, jpeg=False)
    analysis = make_analysis(source)
    ds = seg_of(source, analysis)
    bits = np.unpackbits(np.frombuffer(ds.PixelData, dtype=np.uint8), bitorder="little")
    n = 350 * 350
    assert len(ds.PixelData) == (ds.NumberOfFrames * n + 7) // 8 + ((ds.NumberOfFrames * n + 7) // 8) % 2
    frame_2 = bits[n : 2 * n].reshape(350, 350)  # segment 1 (pleural line), source frame 2
    np.testing.assert_array_equal(frame_2, analysis.labels[1] == SegmentClass.PLEURAL_LINE)


def test_labelmap_rle_roundtrip() -> None:
    source = make_source(350, 350, N_FRAMES, jpeg=False)
    analysis = make_analysis(source, with_effusion=True)
    ds = seg_of(source, analysis, SegOptions(segmentation_type="LABELMAP", compress=True))
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.RLELossless
    assert ds.NumberOfFrames == N_FRAMES and ds.BitsAllocated == 8
    np.testing.assert_array_equal(ds.pixel_array, analysis.labels)
    seg = hd.seg.Segmentation.from_dataset(ds)
    arr = seg.get_pixels_by_source_frame(
        source.SOPInstanceUID,
        source_frame_numbers=[1, 2, 3, 4],
        segment_numbers=[1, 5],
        combine_segments=True,
    )
    expected = np.where(np.isin(analysis.labels, [1, 5]), analysis.labels, 0)
    np.testing.assert_array_equal(arr, expected)


def test_all_background_keeps_every_segment() -> None:
    source = make_source(64, 64, 2, jpeg=False)
    analysis = make_analysis(source)
    analysis.labels[:] = 0
    ds = seg_of(source, analysis)
    assert ds.NumberOfFrames == len(SEGMENT_CLASSES)  # one empty frame each, on the first source frame
    assert not np.any(ds.pixel_array)


def test_max_frames_subsamples_evenly() -> None:
    assert selected_source_frames(10, 2, None) == list(range(10))
    assert selected_source_frames(10, 2, 20) == list(range(10))
    assert selected_source_frames(10, 2, 8) == [0, 3, 6, 9]
    assert selected_source_frames(900, 5, WEASIS_MAX_FRAMES) == list(range(0, 900, 12))
    with pytest.raises(ValueError):
        selected_source_frames(10, 6, 5)
    source = make_source(64, 64, 6, jpeg=False)
    analysis = make_analysis(source)
    assert len(present_classes(analysis.labels)) == 5
    ds = seg_of(source, analysis, SegOptions(max_frames=10))
    refs = [
        int(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber)
        for g in ds.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(set(refs)) == [1, 4]
    assert ds.NumberOfFrames == 9  # 5 segments x 2 frames, less consolidation on frame 4 (odd: none)


def test_rejects_mismatched_labels_and_binary_compression() -> None:
    source = make_source(64, 64, 2, jpeg=False)
    analysis = make_analysis(source)
    with pytest.raises(ValueError, match="compression"):
        seg_of(source, analysis, SegOptions(compress=True))
    analysis.labels = analysis.labels[:, :, :32]
    with pytest.raises(ValueError, match="do not match"):
        seg_of(source, analysis)


def test_outputs_are_deterministic(case: tuple[pydicom.Dataset, Analysis]) -> None:
    source, analysis = case
    first, second = outputs_for(source, analysis), outputs_for(source, analysis)
    assert set(first) == {"SEG", "SR", "OT"}
    for kind in first:
        assert first[kind].SOPInstanceUID == second[kind].SOPInstanceUID
        assert first[kind].SeriesInstanceUID == second[kind].SeriesInstanceUID
    uids = {ds.SOPInstanceUID for ds in first.values()} | {ds.SeriesInstanceUID for ds in first.values()}
    assert len(uids) == 6


def test_outputs_share_no_elements_with_source() -> None:
    """Editing an output (e.g. a coercing PACS gateway) must not alter the source dataset."""
    source = make_source(64, 64, 2, jpeg=False)
    before = {
        kw: source[kw].value for kw in ("PatientName", "PatientBirthDate", "PatientOrientation", "StudyID")
    }
    for ds in outputs_for(source, make_analysis(source)).values():
        ds.PatientName = "Changed^Name"
        ds.PatientBirthDate = "19000101"
        ds.StudyID = "changed"
        if "PatientOrientation" in ds:
            ds.PatientOrientation[0] = "P"
    after = {kw: source[kw].value for kw in before}
    assert after == before


def test_deflated_binary_is_the_same_seg_and_a_fraction_of_the_size() -> None:
    """LUSAI_SEG_ENCODING=binary-deflated: Deflated Explicit VR Little Endian, masks unchanged."""
    source = make_source(120, 160, 12, jpeg=False)
    analysis = make_analysis(source)
    plain, deflated = seg_of(source, analysis), seg_of(source, analysis, SegOptions(deflate=True))
    assert deflated.file_meta.TransferSyntaxUID == pydicom.uid.DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(deflated.pixel_array, plain.pixel_array)
    sizes = []
    for ds in (plain, deflated):
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        sizes.append(len(buf.getvalue()))
    assert sizes[1] < sizes[0] / 10, sizes
    with pytest.raises(ValueError, match="choose one"):
        seg_of(source, analysis, SegOptions(segmentation_type="LABELMAP", compress=True, deflate=True))


def test_sparse_frames_cover_exactly_the_pixels_of_each_segment() -> None:
    """No SEG frame is empty, and every labelled pixel is in one (a moving consolidation)."""
    source = make_source(40, 48, 7, jpeg=False)
    analysis = make_analysis(source)
    ds = seg_of(source, analysis)
    pix = ds.pixel_array
    refs = [
        (
            int(g.SegmentIdentificationSequence[0].ReferencedSegmentNumber),
            int(g.DerivationImageSequence[0].SourceImageSequence[0].ReferencedFrameNumber),
        )
        for g in ds.PerFrameFunctionalGroupsSequence
    ]
    assert all(pix[i].any() for i in range(len(refs)))
    rebuilt = np.zeros_like(analysis.labels)
    for i, (segment, frame) in enumerate(refs):
        rebuilt[frame - 1][pix[i] > 0] = segment
    np.testing.assert_array_equal(rebuilt, analysis.labels)
