"""Synthetic ultrasound cines in every transfer syntax scanners send, plus deliberately broken ones.

Used by the receive tests and by ``bench/ingest.py``. Compressed frames are encoded with Pillow
(JPEG Baseline with 4:2:2 chroma subsampling, JPEG 2000 lossless) and pydicom (RLE), so no DCMTK
is needed to make them; JPEG-LS and JPEG Lossless come from DCMTK when the tests have it.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from workers.preprocess.wrap import encode_jpeg_ybr422

US_MULTIFRAME = "1.2.840.10008.5.1.4.1.1.3.1"
US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def frames_array(frames: int, rows: int, cols: int, rgb: bool, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients plus noise: realistic compressibility, distinct frames."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols]
    out = np.empty((frames, rows, cols, 3) if rgb else (frames, rows, cols), np.uint8)
    for f in range(frames):
        base = ((x + y + 3 * f) % 256).astype(np.uint8)
        noise = rng.integers(0, 16, size=(rows, cols), dtype=np.uint8)
        plane = base // 2 + noise
        out[f] = np.stack([plane, plane[::-1], 255 - plane], -1) if rgb else plane
    return out


def base_dataset(
    *,
    sop_class: str = US_MULTIFRAME,
    frames: int = 4,
    rows: int = 64,
    cols: int = 80,
    rgb: bool = False,
    modality: str = "US",
    body_part: str | None = "CHEST",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid or generate_uid())
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = UID(sop_class)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = UID(study_uid or generate_uid())
    ds.SeriesInstanceUID = UID(series_uid or generate_uid())
    ds.PatientID = "TEST-0001"
    ds.PatientName = "Test^Lung"
    ds.AccessionNumber = "ACC1"
    ds.StudyDate = "20260101"
    ds.StudyDescription = "LUNG US"
    ds.SeriesDescription = "R1 anterior"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = modality
    if body_part is not None:
        ds.BodyPartExamined = body_part
    ds.Rows = rows
    ds.Columns = cols
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = "RGB" if rgb else "MONOCHROME2"
    if rgb:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if sop_class == US_MULTIFRAME:
        ds.NumberOfFrames = frames
        ds.FrameTime = 33.3
        ds.FrameIncrementPointer = 0x00181063
    return ds


def cine(
    syntax: str = "raw",
    *,
    frames: int = 4,
    rows: int = 64,
    cols: int = 80,
    rgb: bool = False,
    seed: int = 0,
    **kw: object,
) -> Dataset:
    """A US multi-frame cine; ``syntax`` is raw, jpeg (Baseline YBR_FULL_422), j2k, rle or deflate."""
    ds = base_dataset(frames=frames, rows=rows, cols=cols, rgb=rgb or syntax == "jpeg", **kw)  # type: ignore[arg-type]
    arr = frames_array(frames, rows, cols, rgb=bool(ds.SamplesPerPixel == 3), seed=seed)
    if syntax in ("raw", "deflate", "bigendian"):
        ds.PixelData = arr.tobytes()
        if syntax == "deflate":
            ds.file_meta.TransferSyntaxUID = UID("1.2.840.10008.1.2.1.99")
        return ds
    if syntax == "jpeg":
        encode_jpeg_ybr422(ds, arr, quality=90)
        ds.LossyImageCompression = "01"
        return ds
    if syntax == "j2k":
        out = []
        for f in arr:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, "JPEG2000", irreversible=False, no_jp2=True)
            out.append(buf.getvalue())
        ds.PixelData = encapsulate(out)
        if ds.SamplesPerPixel == 3:
            ds.PhotometricInterpretation = "YBR_RCT"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True  # encapsulated: PS3.5 A.4
        return ds
    if syntax == "rle":
        ds.PixelData = arr.tobytes()
        ds.compress(RLELossless, encoding_plugin="pydicom")
        return ds
    raise ValueError(syntax)


def save(ds: Dataset, path: Path, *, valid: bool = True) -> Path:
    """Write a Part 10 file; ``valid=False`` keeps whatever (broken) content ``ds`` has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if valid:
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.preamble = b"\0" * 128
        ds.save_as(path, enforce_file_format=False)
    return path
