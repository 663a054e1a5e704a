"""Synthetic DICOM for the tests, built in one place (no PHI: made-up identifiers).

- Frames: pixel arrays with realistic compressibility, noise, or the project's lung phantom.
- :func:`us_cine`: the one builder of an ultrasound object, in every transfer syntax and
  photometric interpretation scanners send; the ready-made cines (:func:`cine`, the phantom and
  noise files, the scanner export :func:`make_source`) and the broken variants the receive tests
  send are this builder with options, or its output edited by the test.
- Analyses: class maps and findings of a source, for the DICOM writer tests.

Compressed frames are encoded with Pillow (JPEG Baseline 4:2:2 through
:func:`workers.preprocess.wrap.encode_jpeg_ybr422`, JPEG 2000 lossless) and pydicom (RLE), so no
DCMTK is needed to make them. ``bench/ingest.py`` builds its load from :func:`cine` too.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    UltrasoundMultiFrameImageStorage,
)

from service.core.dicom import US_MULTIFRAME_RETIRED, US_SOP_CLASSES
from service.core.model_package import ModelInfo
from service.core.segments import SegmentClass
from workers.domain import Analysis, FrameFindings, VideoFindings
from workers.preprocess.wrap import encode_jpeg_ybr422, frames_to_dataset

# --- frames --------------------------------------------------------------------------------------


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


def noise_frames(frames: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Uniform grey noise: no lung, no structure (what gradability must refuse)."""
    return np.random.default_rng(seed).integers(0, 255, (frames, rows, cols), dtype=np.uint8)


def frames_rgb(n: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Grey noise as RGB ``(n, rows, cols, 3)``: the decoded frames the DICOM writers take."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 200, size=(n, rows, cols), dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


# --- the builder ---------------------------------------------------------------------------------

Syntax = Literal["raw", "jpeg", "j2k", "rle", "deflate"]
Region = Literal["full", "sector"]

#: Millimetres per pixel of the ``"full"`` region (a typical convex probe at 16 cm depth).
FULL_REGION_MM = 0.457
#: The SOP classes whose objects carry several frames (the rest get one, and no cine attributes).
MULTI_FRAME_CLASSES = (UltrasoundMultiFrameImageStorage, US_MULTIFRAME_RETIRED)


def sector_region(rows: int, cols: int) -> Dataset:
    """A calibrated 2D tissue region inset from the image edges (0.25 x 0.3 mm pixels), as scanners
    put the sector below a header bar."""
    r = Dataset()
    r.RegionSpatialFormat = 1
    r.RegionDataType = 1
    r.RegionFlags = 0
    r.RegionLocationMinX0 = cols // 10
    r.RegionLocationMinY0 = rows // 20
    r.RegionLocationMaxX1 = cols - cols // 10 - 1
    r.RegionLocationMaxY1 = rows - 1
    r.PhysicalUnitsXDirection = 3
    r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = 0.025
    r.PhysicalDeltaY = 0.03
    return r


def us_cine(
    frames: np.ndarray,
    *,
    syntax: Syntax = "raw",
    sop_class: str = UltrasoundMultiFrameImageStorage,
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    modality: str = "US",
    body_part: str | None = "CHEST",
    series_description: str | None = "LUS R1",
    region: Region | None = "full",
    **attributes: object,
) -> Dataset:
    """An ultrasound object of ``frames``: ``(n, rows, cols)`` grey or ``(n, rows, cols, 3)`` RGB uint8.

    ``syntax``: raw (Explicit VR Little Endian; MONOCHROME2 or RGB), jpeg (Baseline, YBR_FULL_422),
    j2k (lossless; YBR_RCT for colour), rle or deflate. ``sop_class``: a single-frame class drops
    the cine attributes, a class other than ultrasound the region too. ``region``: calibrated over
    the whole image (``"full"``, :data:`FULL_REGION_MM`), inset (``"sector"``,
    :func:`sector_region`) or none. ``attributes``: further DICOM keywords (patient and study
    fields, dates, Laterality ...), set last, so they override the made-up defaults; None leaves
    an attribute out.
    """
    grey = frames if frames.ndim == 3 else frames[..., 0]
    ds = frames_to_dataset(grey, mm_per_pixel=FULL_REGION_MM if region == "full" else None, uid=sop_uid)
    rows, cols = grey.shape[1:]
    if region == "sector":
        ds.SequenceOfUltrasoundRegions = [sector_region(rows, cols)]
    if study_uid:
        ds.StudyInstanceUID = UID(study_uid)
    if series_uid:
        ds.SeriesInstanceUID = UID(series_uid)
    ds.Modality = modality
    _encode(ds, frames, syntax)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    if sop_class in MULTI_FRAME_CLASSES:
        ds.FrameIncrementPointer = 0x00181063  # FrameTime
    else:
        del ds.NumberOfFrames, ds.FrameTime
    if sop_class not in US_SOP_CLASSES and "SequenceOfUltrasoundRegions" in ds:
        del ds.SequenceOfUltrasoundRegions
    made_up: dict[str, object] = {
        "PatientName": "TEST^PHANTOM",
        "PatientID": "PHANTOM-1",
        "PatientBirthDate": "",
        "PatientSex": "O",
        "StudyDate": "20260101",
        "StudyTime": "120000",
        "AccessionNumber": "ACC1",
        "ReferringPhysicianName": "",
        "StudyID": "1",
        "SeriesNumber": 1,
        "InstanceNumber": 1,
        "StudyDescription": "Lung ultrasound",
        "SeriesDescription": series_description,
        "BodyPartExamined": body_part,
        "PatientOrientation": "",
        "Manufacturer": "lusai-tests",
        "ImageType": ["ORIGINAL", "PRIMARY", "", "0001"],
    }
    for keyword, value in (made_up | attributes).items():
        if value is not None:
            setattr(ds, keyword, value)
        elif keyword in ds:
            delattr(ds, keyword)
    return ds


def _encode(ds: Dataset, frames: np.ndarray, syntax: Syntax) -> None:
    """Replace the MONOCHROME2 pixel data :func:`frames_to_dataset` wrote with ``frames`` in ``syntax``."""
    rgb = frames.ndim == 4
    if syntax == "jpeg":
        encode_jpeg_ybr422(ds, frames, quality=90)
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        return
    if rgb:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.PixelData = np.ascontiguousarray(frames, np.uint8).tobytes()
    if syntax == "raw":
        return
    if syntax == "deflate":
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    elif syntax == "rle":
        ds.compress(RLELossless, encoding_plugin="pydicom")
    elif syntax == "j2k":
        out = []
        for f in frames:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, "JPEG2000", irreversible=False, no_jp2=True)
            out.append(buf.getvalue())
        ds.PixelData = encapsulate(out)
        if rgb:
            ds.PhotometricInterpretation = "YBR_RCT"
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True  # encapsulated: PS3.5 A.4
    else:
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


# --- ready-made cines ----------------------------------------------------------------------------


def cine(
    syntax: Syntax = "raw",
    *,
    frames: int = 4,
    rows: int = 64,
    cols: int = 80,
    rgb: bool = False,
    seed: int = 0,
    **kw: object,
) -> Dataset:
    """A small cine of :func:`frames_array` frames (RGB ones for jpeg), for transport tests."""
    arr = frames_array(frames, rows, cols, rgb=rgb or syntax == "jpeg", seed=seed)
    return us_cine(arr, syntax=syntax, **kw)  # type: ignore[arg-type]


def phantom_cine_file(
    path: Path, *, frames: int = 12, jpeg: bool = False, seed: int = 0, **kw: object
) -> Path:
    """Write a cine rendered by the project's own phantom generator, so analysis has lung to find."""
    from workers.training.phantom import make_cine

    c = make_cine(np.random.default_rng(seed), n_frames=frames, src=(300, 320), kind="convex")
    ds = us_cine(c.frames, syntax="jpeg" if jpeg else "raw", **kw)  # type: ignore[arg-type]
    return save(ds, path)


def noise_cine_file(
    path: Path,
    *,
    frames: int = 4,
    rows: int = 64,
    cols: int = 80,
    seed: int = 0,
    jpeg: bool = False,
    **kw: object,
) -> Path:
    """Write a cine of :func:`noise_frames`: valid DICOM with nothing to find."""
    ds = us_cine(noise_frames(frames, rows, cols, seed), syntax="jpeg" if jpeg else "raw", **kw)  # type: ignore[arg-type]
    return save(ds, path)


#: Headers pydicom fails on with other errors than InvalidDicomError (found by bench/chaos/fuzz.py):
#: Columns (US) with a 3-byte value and Rows relabelled FD raise BytesLengthException when read,
#: a file cut inside the Pixel Data element header raises struct.error.
MALFORMED_HEADERS = ("odd-length-US", "wrong-VR-Rows", "cut-in-pixel-header")


def malformed_header_cine(case: str) -> bytes:
    """A small raw cine as Part 10 bytes, with one of :data:`MALFORMED_HEADERS` patched in."""
    buf = io.BytesIO()
    cine("raw", frames=2).save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    if case == "cut-in-pixel-header":
        return data[: data.index(b"\xe0\x7f\x10\x00") + 10]
    old, new = {
        "odd-length-US": (b"\x28\x00\x11\x00US\x02\x00P\x00", b"\x28\x00\x11\x00US\x03\x00P\x00\x00"),
        "wrong-VR-Rows": (b"\x28\x00\x10\x00US", b"\x28\x00\x10\x00FD"),
    }[case]
    assert data.count(old) == 1
    return data.replace(old, new)


# --- sources and analyses for the DICOM writers --------------------------------------------------

MODEL = ModelInfo(name="lusai-unet", version="1.2.0", weights_sha256="ab" * 32, package_sha256="cd" * 32)


def make_source(rows: int, cols: int, n_frames: int, *, jpeg: bool, uid: str | None = None) -> Dataset:
    """A US Multi-frame Image (A.7) as a scanner exports it: raw MONOCHROME2 or JPEG YBR_FULL_422,
    every Type 2 attribute the writers copy, Laterality, an inset calibrated region, no descriptions."""
    return us_cine(
        frames_rgb(n_frames, rows, cols)[..., 0],
        syntax="jpeg" if jpeg else "raw",
        sop_uid=uid,
        body_part=None,
        series_description=None,
        region="sector",
        SpecificCharacterSet="ISO_IR 192",
        PatientName="Test^Lung",
        PatientID="LUS-0001",
        PatientBirthDate="19700101",
        PatientSex="F",
        StudyTime="101500",
        StudyDescription=None,
        SeriesNumber=3,
        Manufacturer="Synthetic",
        PatientOrientation=["A", "F"],
        Laterality="R",
        ContentDate="20260101",
        ContentTime="101600",
        AcquisitionDateTime="20260101101600",
        ImageType=["ORIGINAL", "PRIMARY", "ABDOMINAL", ""],
        LossyImageCompression="01" if jpeg else "00",
        LossyImageCompressionRatio=10 if jpeg else None,
        FrameTime=33.3,
    )


def make_labels(n: int, rows: int, cols: int, *, with_effusion: bool = False) -> np.ndarray:
    """Class maps with a pleural line, A-lines, B-lines moving over frames, consolidation and ribs."""
    labels = np.zeros((n, rows, cols), dtype=np.uint8)
    y = rows // 5
    for f in range(n):
        labels[f, y : y + 3, cols // 8 : cols - cols // 8] = SegmentClass.PLEURAL_LINE
        labels[f, 2 * y : 2 * y + 2, cols // 4 : cols // 2] = SegmentClass.A_LINE
        x = cols // 3 + 7 * f
        labels[f, y + 3 :, x : x + 5] = SegmentClass.B_LINE
        labels[f, :y, : cols // 10] = SegmentClass.RIB_SHADOW
        if f % 2 == 0:
            labels[f, 3 * y : 3 * y + 11, cols // 2 + 1 : cols // 2 + 14] = SegmentClass.CONSOLIDATION
        if with_effusion:
            labels[f, rows - 20 :, 5:30] = SegmentClass.EFFUSION
    labels[0, 0, 0] = SegmentClass.RIB_SHADOW  # odd first pixel: catches bit-order mistakes
    return labels


def make_analysis(
    source: Dataset, *, key_frame: int = 1, score: int = 2, with_effusion: bool = False
) -> Analysis:
    """What the pipeline would return for ``source``: :func:`make_labels` and findings to match."""
    n, rows, cols = int(source.NumberOfFrames), int(source.Rows), int(source.Columns)
    frame_scores = tuple(score if i == key_frame else max(0, score - 1) for i in range(n))
    frames = tuple(
        FrameFindings(
            index=i,
            score=frame_scores[i],
            pleura_scanlines=cols // 2,
            b_line_scanlines=5,
            b_line_fraction=0.07,
            b_line_count=1,
            confluent=False,
            pleura_irregularity=0.1,
            pleura_breaks=0,
            a_lines=True,
            consolidation_area_mm2=12.5 if i % 2 == 0 else 0.0,
            consolidation_depth_mm=3.0,
            effusion_area_mm2=0.0,
        )
        for i in range(n)
    )
    findings = VideoFindings(
        score=score,
        frame_scores=frame_scores,
        key_frame=key_frame,
        b_line_fraction=0.125,
        b_line_count=3,
        bla_score=1.5,
        consolidation=True,
        effusion=with_effusion,
        consolidation_area_mm2=12.5,
        effusion_area_mm2=30.0 if with_effusion else 0.0,
        pleura_irregular=False,
        frames=frames,
    )
    return Analysis(
        sop_instance_uid=source.SOPInstanceUID,
        frames=n,
        findings=findings,
        labels=make_labels(n, rows, cols, with_effusion=with_effusion),
        model=MODEL,
        timings_ms={"total": 1.0},
    )
