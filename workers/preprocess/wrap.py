"""Wrap grayscale frames in a DICOM US Multi-frame dataset (phantom cine, mp4 evaluation input),
and re-encode a dataset's frames the way most scanners export cine (JPEG Baseline YBR_FULL_422)."""

from __future__ import annotations

import io

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)


def frames_to_dataset(
    frames: np.ndarray, mm_per_pixel: float | None = None, uid: str | None = None
) -> Dataset:
    """An uncompressed MONOCHROME2 US Multi-frame Image of ``(n, rows, cols)`` uint8 frames."""
    n, rows, cols = frames.shape
    ds = Dataset()
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.NumberOfFrames = n
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.FrameTime = 40.0
    if mm_per_pixel is not None:
        region = Dataset()
        region.RegionSpatialFormat = 1
        region.RegionDataType = 1
        region.RegionFlags = 0
        region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
        region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
        region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = region.PhysicalDeltaY = mm_per_pixel / 10.0
        ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = np.ascontiguousarray(frames, dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dataset.validate_file_meta(ds.file_meta, enforce_standard=False)
    return ds


def encode_jpeg_ybr422(ds: Dataset, frames: np.ndarray, quality: int = 90) -> None:
    """Set ``ds``'s pixel data to JPEG Baseline YBR_FULL_422 (4:2:2) frames, in place.

    ``frames`` is ``(n, rows, cols)`` grey or ``(n, rows, cols, 3)`` RGB uint8. Pillow converts
    RGB to YCbCr as the JPEG file interchange format defines, which is what YBR_FULL_422 means.
    """
    rgb = frames if frames.ndim == 4 else np.stack([frames] * 3, axis=-1)
    encoded = []
    for frame in rgb:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(frame, np.uint8), "RGB").save(
            buf, format="JPEG", quality=quality, subsampling=1
        )
        encoded.append(buf.getvalue())
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PlanarConfiguration = 0
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True  # encapsulated: PS3.5 A.4
    ds.ensure_file_meta()
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
