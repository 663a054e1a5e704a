"""Burned-in overlay Secondary Capture (PS3.3 A.8.5)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest

from service.core.dicom import OutputKind
from service.core.segments import SEGMENTS, SegmentClass, segment
from tests.factories import frames_rgb, make_analysis, make_source
from tests.workers.write_dicom.conftest import NOW
from workers.write_dicom import OutputOptions, OverlayOptions
from workers.write_dicom.build import series_info
from workers.write_dicom.overlay import blend, build_overlay


def smooth_frames() -> np.ndarray:
    ramp = np.linspace(0, 200, 350, dtype=np.float32)
    grey = (ramp[None, :, None] + ramp[None, None, :]) / 2 + np.arange(3)[:, None, None] * 10
    return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=-1)


def overlay(
    jpeg_quality: int | None, grey: bool = False, rgb: np.ndarray | None = None
) -> tuple[pydicom.Dataset, np.ndarray, pydicom.Dataset]:
    source = make_source(350, 350, 3, jpeg=False)
    analysis = make_analysis(source)
    rgb = frames_rgb(3, 350, 350) if rgb is None else rgb
    frames = rgb[..., 0] if grey else rgb
    info = series_info(source, analysis, OutputKind.SC, OutputOptions())
    ds = build_overlay(
        source, analysis, frames, info, options=OverlayOptions(jpeg_quality=jpeg_quality), now=NOW
    )
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    buf.seek(0)
    return pydicom.dcmread(buf), rgb, source


def test_blend_colours_only_labelled_pixels() -> None:
    frames = np.full((1, 4, 4, 3), 100, dtype=np.uint8)
    labels = np.zeros((1, 4, 4), dtype=np.uint8)
    labels[0, 1, 2] = SegmentClass.B_LINE
    out = blend(frames, labels, 0.5)
    expected = np.rint(0.5 * 100 + 0.5 * np.array(segment(SegmentClass.B_LINE).rgb))
    np.testing.assert_array_equal(out[0, 1, 2], expected)
    out[0, 1, 2] = 100
    assert np.all(out == 100)


@pytest.mark.parametrize("grey", [False, True])
def test_uncompressed_overlay(grey: bool) -> None:
    ds, rgb, source = overlay(None, grey)
    assert ds.SOPClassUID == pydicom.uid.MultiFrameTrueColorSecondaryCaptureImageStorage
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (ds.StudyInstanceUID, ds.PatientName) == (source.StudyInstanceUID, source.PatientName)
    assert ds.BurnedInAnnotation == "YES" and ds.SeriesDescription == "LUSAI overlay"
    assert ds.PatientOrientation == source.PatientOrientation and ds.Laterality == "R"
    assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "CodingSchemeIdentificationSequence" not in ds  # uses no 99LUSAI codes
    assert float(ds.FrameTime) == pytest.approx(33.3)
    pixels = ds.pixel_array
    assert pixels.shape[0] == 3 and pixels.shape[1] > 350 and pixels.shape[2] == 350
    image, legend = pixels[:, :350], pixels[:, 350:]
    untouched = make_analysis(source).labels == 0
    np.testing.assert_array_equal(image[untouched], rgb[untouched])
    assert not np.array_equal(image[~untouched], rgb[~untouched])
    colours = {tuple(int(v) for v in px) for px in legend.reshape(-1, 3)}
    assert {row.rgb for row in SEGMENTS} <= colours


def test_jpeg_overlay_decodes_close_to_uncompressed() -> None:
    raw, _, _ = overlay(None, rgb=smooth_frames())
    ds, _, _ = overlay(95, rgb=smooth_frames())
    assert ds.file_meta.TransferSyntaxUID == pydicom.uid.JPEGBaseline8Bit
    assert ds.PhotometricInterpretation == "YBR_FULL_422" and ds.LossyImageCompression == "01"
    decoded = ds.pixel_array  # pydicom converts YBR_FULL_422 to RGB
    error = np.abs(decoded.astype(int) - raw.pixel_array.astype(int)).mean()
    assert error < 2
    assert ds.LossyImageCompressionMethod == "ISO_10918_1"
    assert raw.LossyImageCompression == "00"


def test_overlay_of_lossy_source_stays_lossy() -> None:
    source = make_source(64, 64, 2, jpeg=True)
    analysis = make_analysis(source)
    info = series_info(source, analysis, OutputKind.SC, OutputOptions())
    ds = build_overlay(source, analysis, frames_rgb(2, 64, 64), info, now=NOW)
    assert (ds.LossyImageCompression, ds.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    jpeg = build_overlay(
        source, analysis, frames_rgb(2, 64, 64), info, options=OverlayOptions(jpeg_quality=80), now=NOW
    )
    assert list(jpeg.LossyImageCompressionMethod) == ["ISO_10918_1", "ISO_10918_1"]
    assert len(jpeg.LossyImageCompressionRatio) == 2


def test_rejects_frames_that_do_not_match() -> None:
    source = make_source(64, 64, 2, jpeg=False)
    analysis = make_analysis(source)
    info = series_info(source, analysis, OutputKind.SC, OutputOptions())
    with pytest.raises(ValueError, match="does not match"):
        build_overlay(source, analysis, frames_rgb(3, 64, 64), info, now=NOW)
