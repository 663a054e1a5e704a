"""Synthetic DICOM ultrasound cines for tests (no PHI: made-up identifiers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from workers.preprocess.wrap import encode_jpeg_ybr422


def us_cine(
    frames: np.ndarray,
    *,
    jpeg: bool = False,
    study_uid: str | None = None,
    sop_uid: str | None = None,
    series_description: str = "LUS R1",
    modality: str = "US",
) -> Dataset:
    """A US Multi-frame Image from (n, rows, cols) gray uint8 frames, raw MONOCHROME2 or JPEG YBR_FULL_422."""
    n, rows, cols = frames.shape
    ds = Dataset()
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = sop_uid or generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.PatientName = "TEST^PHANTOM"
    ds.PatientID = "PHANTOM-1"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate, ds.StudyTime = "20260101", "120000"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyDescription = "Lung ultrasound"
    ds.SeriesDescription = series_description
    ds.BodyPartExamined = "CHEST"
    ds.PatientOrientation = ""
    ds.Manufacturer = "lusai-tests"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "", "0001"]
    ds.NumberOfFrames = n
    ds.FrameTime = 40.0
    ds.FrameIncrementPointer = (0x0018, 0x1063)
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = 0, 0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = cols - 1, rows - 1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = region.PhysicalDeltaY = 0.0457
    region.ReferencePixelX0, region.ReferencePixelY0 = cols // 2, 0
    ds.SequenceOfUltrasoundRegions = [region]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta = meta
    if jpeg:
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        encode_jpeg_ybr422(ds, frames, quality=90)
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = frames.astype(np.uint8).tobytes()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def phantom_cine_file(
    path: Path, *, frames: int = 12, jpeg: bool = False, seed: int = 0, **kw: object
) -> Path:
    """Write a cine rendered by the project's own phantom generator, so analysis has lung to find."""
    import numpy as np

    from workers.training.phantom import make_cine

    cine = make_cine(np.random.default_rng(seed), n_frames=frames, src=(300, 320), kind="convex")
    ds = us_cine(cine.frames, jpeg=jpeg, **kw)  # type: ignore[arg-type]
    ds.save_as(path, enforce_file_format=True)
    return path


def noise_cine_file(
    path: Path, *, frames: int = 4, rows: int = 64, cols: int = 80, seed: int = 0, **kw: object
) -> Path:
    rng = np.random.default_rng(seed)
    ds = us_cine(rng.integers(0, 255, (frames, rows, cols), dtype=np.uint8), **kw)  # type: ignore[arg-type]
    ds.save_as(path, enforce_file_format=True)
    return path
