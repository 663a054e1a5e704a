"""Decoding against ground truth for each photometric interpretation and transfer syntax."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, RLELossless

from workers.preprocess import InputError, decode_frames
from workers.preprocess.wrap import encode_jpeg_ybr422, frames_to_dataset


def _gray(n: int = 3, rows: int = 48, cols: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:rows, 0:cols]
    base = (xx * 3 + yy * 2).astype(np.float64)
    frames = [np.clip(base + 40 * k + rng.normal(0, 3, base.shape), 0, 255) for k in range(n)]
    return np.stack(frames).astype(np.uint8)


def _colour_ds(frames_rgb: np.ndarray, photometric: str, planar: int = 0) -> pydicom.Dataset:
    ds = frames_to_dataset(frames_rgb[..., 0])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = planar
    data = np.moveaxis(frames_rgb, -1, 1) if planar else frames_rgb
    ds.PixelData = np.ascontiguousarray(data).tobytes()
    return ds


def test_monochrome2_is_exact() -> None:
    g = _gray()
    assert np.array_equal(decode_frames(frames_to_dataset(g)), g)


def test_monochrome1_is_inverted() -> None:
    g = _gray()
    ds = frames_to_dataset(g)
    ds.PhotometricInterpretation = "MONOCHROME1"
    assert np.array_equal(decode_frames(ds), 255 - g)


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_raw_gives_luma(planar: int) -> None:
    g = _gray()
    rgb = np.stack([g, np.clip(g.astype(int) + 10, 0, 255), g // 2], axis=-1).astype(np.uint8)
    out = decode_frames(_colour_ds(rgb, "RGB", planar))
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out.astype(float) - luma).max() <= 1.0


def test_ybr_full_raw_gives_y() -> None:
    g = _gray()
    ybr = np.stack([g, np.full_like(g, 128), np.full_like(g, 128)], axis=-1)
    assert np.array_equal(decode_frames(_colour_ds(ybr, "YBR_FULL")), g)


def _jpeg_ybr422(g: np.ndarray) -> pydicom.Dataset:
    ds = frames_to_dataset(g)
    encode_jpeg_ybr422(ds, g, quality=95)
    return ds


def test_jpeg_baseline_ybr422_matches_ground_truth_and_pydicom() -> None:
    g = _gray()
    ds = _jpeg_ybr422(g)
    out = decode_frames(ds)
    assert out.shape == g.shape
    assert np.abs(out.astype(int) - g).mean() < 2.0  # lossy, but close
    # pydicom's generic path (YBR -> RGB -> luma) agrees with the fast luminance-only path.
    ref = ds.pixel_array.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out - ref).mean() < 1.5


def test_other_compressed_syntax_goes_through_pydicom() -> None:
    g = _gray()
    ds = frames_to_dataset(g)
    ds.compress(RLELossless, g, encoding_plugin="pydicom")
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(decode_frames(ds), g)


def test_no_pixel_data() -> None:
    ds = frames_to_dataset(_gray())
    del ds.PixelData
    with pytest.raises(InputError, match="no pixel data"):
        decode_frames(ds)


def test_truncated_pixel_data() -> None:
    ds = frames_to_dataset(_gray())
    ds.NumberOfFrames = 5
    with pytest.raises(InputError):
        decode_frames(ds)


def test_jpeg_frame_count_mismatch() -> None:
    ds = _jpeg_ybr422(_gray())
    ds.NumberOfFrames = 4
    with pytest.raises(InputError):
        decode_frames(ds)


def test_jpeg_frame_size_mismatch() -> None:
    ds = _jpeg_ybr422(_gray())
    ds.Rows = 40
    with pytest.raises(InputError):
        decode_frames(ds)


def test_garbage_jpeg_is_input_error() -> None:
    ds = frames_to_dataset(_gray(1))
    ds.PixelData = encapsulate([b"\xff\xd8not a jpeg"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    with pytest.raises(InputError, match="could not be decoded"):
        decode_frames(ds)


def test_zero_frames() -> None:
    ds = frames_to_dataset(_gray())
    ds.NumberOfFrames = 0
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(InputError):
        decode_frames(ds)


def test_frame_rate_from_the_cine_timing_attributes() -> None:
    from pydicom import Dataset

    from workers.preprocess import frame_rate

    ds = Dataset()
    assert frame_rate(ds) is None
    ds.FrameTimeVector = [0, 20, 20, 20]
    assert frame_rate(ds) == pytest.approx(50.0)
    ds.CineRate = 30
    assert frame_rate(ds) == pytest.approx(30.0)
    ds.FrameTime = 40.0
    assert frame_rate(ds) == pytest.approx(25.0)
    ds.FrameTime = 0.0  # nonsense: the next attribute is used
    assert frame_rate(ds) == pytest.approx(30.0)


@pytest.mark.parametrize("syntax", ["raw", "jpeg", "rle"])
def test_some_frames_decode_as_the_same_frames_of_the_whole_cine(syntax: str) -> None:
    """Previews decode only the frames they show: the same pixels, in the order asked."""
    g = _gray(n=5)
    ds = frames_to_dataset(g)
    if syntax == "jpeg":
        ds = _jpeg_ybr422(g)
    elif syntax == "rle":
        ds.compress(RLELossless, g, encoding_plugin="pydicom")
    whole = decode_frames(ds)
    for indices in ([4, 0, 2], [3], [1, 1]):
        np.testing.assert_array_equal(decode_frames(ds, indices), whole[indices])
    with pytest.raises(InputError, match="outside"):
        decode_frames(ds, [5])
