"""Synthetic multi-frame ultrasound sources, analyses and helpers for the DICOM writer tests."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    UltrasoundMultiFrameImageStorage,
    generate_uid,
)

from service.core.model_package import ModelInfo
from service.core.segments import SegmentClass
from workers.domain import Analysis, FrameFindings, VideoFindings
from workers.preprocess.wrap import encode_jpeg_ybr422
from workers.write_dicom import OutputOptions, build_outputs

MODEL = ModelInfo(name="lusai-unet", version="1.2.0", weights_sha256="ab" * 32, package_sha256="cd" * 32)


def _region(rows: int, cols: int) -> Dataset:
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


def frames_rgb(n: int, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 200, size=(n, rows, cols), dtype=np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1)


def make_source(rows: int, cols: int, n_frames: int, *, jpeg: bool, uid: str | None = None) -> Dataset:
    """A US Multi-frame Image (A.7) as a scanner would send it: raw MONOCHROME2 or JPEG YBR_FULL_422."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = UltrasoundMultiFrameImageStorage
    ds.SOPInstanceUID = uid or generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Test^Lung"
    ds.PatientID = "LUS-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.StudyDate, ds.StudyTime = "20260101", "101500"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC1"
    ds.Modality = "US"
    ds.SeriesNumber = 3
    ds.Manufacturer = "Synthetic"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["A", "F"]
    ds.Laterality = "R"
    ds.ContentDate, ds.ContentTime = "20260101", "101600"
    ds.AcquisitionDateTime = "20260101101600"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL", ""]
    ds.LossyImageCompression = "01" if jpeg else "00"
    if jpeg:
        ds.LossyImageCompressionRatio = 10
        ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.Rows, ds.Columns = rows, cols
    ds.NumberOfFrames = n_frames
    ds.FrameTime = 33.3
    ds.FrameIncrementPointer = 0x00181063
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.SequenceOfUltrasoundRegions = [_region(rows, cols)]
    rgb = frames_rgb(n_frames, rows, cols)
    if jpeg:
        encode_jpeg_ybr422(ds, rgb, quality=90)
        ts = JPEGBaseline8Bit
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = rgb[..., 0].tobytes()
        ts = ExplicitVRLittleEndian
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ts
    ds.file_meta = meta
    return ds


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


NOW = dt.datetime(2026, 1, 2, 3, 4, 5)
N_FRAMES = 4

#: (rows, cols, jpeg): BLUS-sized 350 x 350 (122500 px, not a multiple of 8) and 600 x 800.
SOURCE_KINDS = [(350, 350, False), (600, 800, True), (350, 350, True), (600, 800, False)]


def require_external(what: str, available: bool) -> None:
    """Skip when an external tool is missing, unless LUSAI_REQUIRE_EXTERNAL=1 makes it a failure."""
    if available:
        return
    if os.environ.get("LUSAI_REQUIRE_EXTERNAL") == "1":
        pytest.fail(f"{what} is required (LUSAI_REQUIRE_EXTERNAL=1) but missing")
    pytest.skip(f"{what} not available")


def outputs_for(
    source: Dataset,
    analysis: Analysis,
    options: OutputOptions | None = None,
    *,
    validate: bool = False,
) -> dict[str, Dataset]:
    """Build without validation (tests validate explicitly) and key the objects by Modality."""
    opts = replace(options or OutputOptions(), validate=validate)
    n, rows, cols = analysis.labels.shape
    rgb = frames_rgb(n, rows, cols, seed=1)
    outputs = build_outputs(source, analysis, frames_rgb=rgb, options=opts, now=NOW)
    return {o.dataset.Modality: o.dataset for o in outputs}
