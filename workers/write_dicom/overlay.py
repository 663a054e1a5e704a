"""Burned-in overlay fallback: Multi-frame True Color Secondary Capture (PS3.3 A.8.5).

For viewers and PACS that cannot display SEG, every source frame is rendered with the class
colours alpha-blended over the image and a legend strip (class colours, score, algorithm) appended
below it, so no anatomy is hidden. Frames come in decoded (``frames_rgb``); decoding belongs to the
caller, which already decoded them for inference. Output is uncompressed RGB or JPEG Baseline
(YBR_FULL_422, PS3.5 8.2.1) per frame.
"""

from __future__ import annotations

import datetime as dt
import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
)

from service.core.segments import SEGMENTS
from workers.domain import Analysis
from workers.write_dicom.common import (
    SeriesInfo,
    copy_patient_study,
    file_meta,
    lossy_history,
    set_series_and_equipment,
    source_image_item,
)

_LINE = 14  # legend line height in pixels
_DEFAULT_FRAME_TIME_MS = 1000.0 / 30.0


@dataclass(frozen=True)
class OverlayOptions:
    """``alpha``: opacity of the class colours; ``jpeg_quality``: None for uncompressed RGB."""

    alpha: float = 0.45
    jpeg_quality: int | None = None


def blend(frames_rgb: np.ndarray, labels: np.ndarray, alpha: float) -> np.ndarray:
    """Alpha-blend the class colours of ``labels`` (F, R, C) over ``frames_rgb`` (F, R, C, 3).

    Only labelled pixels are computed: cines are large and mostly background.
    """
    lut = np.zeros((256, 3), dtype=np.float32)
    for row in SEGMENTS:
        lut[row.number] = row.rgb
    mask = np.isin(labels, [row.number for row in SEGMENTS])
    out = frames_rgb.copy()
    mixed = (1.0 - alpha) * frames_rgb[mask].astype(np.float32) + alpha * lut[labels[mask]]
    out[mask] = np.clip(np.rint(mixed), 0, 255).astype(np.uint8)
    return out


def legend_title(analysis: Analysis) -> str:
    """The legend's first line; a cine that is not gradable gets its reason, never a number."""
    f, m = analysis.findings, analysis.model
    verdict = f"LUS score {f.score}" if f.gradable else f"LUS not gradable ({f.ungradable_reason})"
    return f"{verdict} (key frame {f.key_frame + 1}) - {m.name} {m.version}"


def legend_strip(width: int, analysis: Analysis) -> np.ndarray:
    """Legend (class colours in two columns) with the score line, as an RGB array."""
    n_rows = (len(SEGMENTS) + 1) // 2
    height = _LINE * (n_rows + 1) + 6
    img = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    draw.text(
        (4, 2),
        legend_title(analysis),
        fill=(255, 255, 255),
        font=font,
    )
    col_w = width // 2
    for i, row in enumerate(SEGMENTS):
        x, y = 4 + (i % 2) * col_w, 2 + _LINE * (1 + i // 2)
        draw.rectangle((x, y + 2, x + 9, y + 11), fill=row.rgb)
        draw.text((x + 14, y), row.label, fill=(255, 255, 255), font=font)
    return np.asarray(img, dtype=np.uint8)


def render(frames_rgb: np.ndarray, analysis: Analysis, alpha: float) -> np.ndarray:
    """Overlay frames with the legend appended: (F, R + legend, C, 3) uint8."""
    frames = np.asarray(frames_rgb)
    if frames.ndim == 3:
        frames = np.repeat(frames[..., None], 3, axis=-1)
    if frames.dtype != np.uint8 or frames.shape[:3] != analysis.labels.shape or frames.shape[3] != 3:
        raise ValueError(
            f"frames_rgb {frames.shape} {frames.dtype} does not match labels {analysis.labels.shape}"
        )
    blended = blend(frames, np.asarray(analysis.labels), alpha)
    legend = legend_strip(frames.shape[2], analysis)
    strip = np.broadcast_to(legend, (frames.shape[0], *legend.shape))
    return np.concatenate([blended, strip], axis=1)


def _cine(source: Dataset, ds: Dataset) -> None:
    """Cine (C.7.6.5) and Frame Increment Pointer, from the source's timing when it has one."""
    if "FrameTimeVector" in source and "FrameTime" not in source:
        ds.FrameTimeVector = list(source.FrameTimeVector)
        ds.FrameIncrementPointer = 0x00181065
        return
    frame_time = source.get("FrameTime")
    if frame_time is None and source.get("CineRate"):
        frame_time = 1000.0 / float(source.CineRate)
    ds.FrameTime = frame_time if frame_time is not None else f"{_DEFAULT_FRAME_TIME_MS:.4f}"
    ds.FrameIncrementPointer = 0x00181063
    if "CineRate" in source:
        ds.CineRate = source.CineRate


def build_overlay(
    source: Dataset,
    analysis: Analysis,
    frames_rgb: np.ndarray,
    series: SeriesInfo,
    *,
    options: OverlayOptions = OverlayOptions(),
    now: dt.datetime,
) -> Dataset:
    """The Secondary Capture; ``frames_rgb`` are the decoded source frames (F, R, C[, 3]) uint8."""
    pixels = render(frames_rgb, analysis, options.alpha)
    ds = Dataset()
    copy_patient_study(source, ds)
    set_series_and_equipment(ds, source, series, analysis.model, "OT", now=now)
    ds.SOPClassUID = MultiFrameTrueColorSecondaryCaptureImageStorage
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"Segmentation overlay by {analysis.model.name} {analysis.model.version}"
    ds.SourceImageSequence = [source_image_item(source)]
    if "PatientOrientation" in source:
        ds.PatientOrientation = list(source.PatientOrientation)
    else:
        ds.PatientOrientation = None
    if "ImageLaterality" in source:
        ds.ImageLaterality = source.ImageLaterality
    ds.BurnedInAnnotation = "YES"
    ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[1], pixels.shape[2]
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    _cine(source, ds)
    if options.jpeg_quality is None:
        ds.PhotometricInterpretation = "RGB"
        lossy_history(source, ds)
        ds.PixelData = pixels.tobytes()
        ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian)
        return ds
    encoded = []
    for frame in pixels:
        buf = io.BytesIO()
        Image.fromarray(frame, "RGB").save(buf, format="JPEG", quality=options.jpeg_quality, subsampling=1)
        encoded.append(buf.getvalue())
    ds.PhotometricInterpretation = "YBR_FULL_422"
    lossy_history(source, ds, (f"{pixels.nbytes / sum(len(e) for e in encoded):.2f}", "ISO_10918_1"))
    ds.PixelData = encapsulate(encoded)
    ds["PixelData"].VR = "OB"
    ds.file_meta = file_meta(ds.SOPClassUID, ds.SOPInstanceUID, JPEGBaseline8Bit)
    return ds
