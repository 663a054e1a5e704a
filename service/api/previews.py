"""Preview images for people who would rather look than read: key frame PNG, animated GIF/WebP.

Source frames are decoded with the workers' decoder (pydicom's ``pixel_array`` if it is absent);
class maps are read back from the stored SEG with pydicom, frame by frame through the per-frame
functional groups (each SEG frame names its segment and its source frame), because highdicom
cannot parse SEGs of multi-frame ultrasound without a patient coordinate system. Rendered files
are cached under ``LUSAI_DATA_DIR/previews`` by result ID: a result never changes, so neither
does its preview. No patient data is drawn on the images.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset

RENDER_VERSION = 1
Kind = Literal["png", "gif", "webp"]

#: Segment number -> (label, RGB); numbers follow workers.domain.SegmentClass.
CLASSES: dict[int, tuple[str, tuple[int, int, int]]] = {
    1: ("Pleural line", (255, 215, 0)),
    2: ("A-line", (0, 170, 255)),
    3: ("B-line", (255, 40, 40)),
    4: ("Consolidation", (200, 0, 255)),
    5: ("Effusion", (0, 230, 120)),
    6: ("Rib shadow", (150, 150, 150)),
}
ALPHA = 0.45
_LUT = np.zeros((256, 3), dtype=np.float32)
for _n, (_label, _rgb) in CLASSES.items():
    _LUT[_n] = _rgb


class PreviewUnavailable(Exception):
    """The source or its SEG cannot be read (missing file, undecodable pixels)."""


def decode_source(path: Path) -> np.ndarray:
    """All frames of the source as (frames, rows, cols) uint8 grayscale."""
    try:
        ds = pydicom.dcmread(path)
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise PreviewUnavailable("source object unreadable") from exc
    decode: Callable[[Dataset], np.ndarray] = _pydicom_gray
    with contextlib.suppress(ImportError):  # the API may be deployed without the workers package
        from workers.preprocess.decode import decode_frames as decode
    try:
        return np.asarray(decode(ds), dtype=np.uint8)
    except Exception as exc:
        raise PreviewUnavailable("source pixels could not be decoded") from exc


def _pydicom_gray(ds: Dataset) -> np.ndarray:
    arr = np.asarray(ds.pixel_array)
    n = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1))
    if spp == 3:
        if n == 1:
            arr = arr[None]
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
            arr = arr[..., 0]
        else:
            arr = arr.astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    elif n == 1:
        arr = arr[None]
    arr = arr.astype(np.float32)
    hi = float(arr.max()) if arr.size else 0.0
    if int(ds.get("BitsStored", 8)) > 8 and hi > 0:
        arr = arr * (255.0 / hi)
    out = np.clip(arr, 0, 255).astype(np.uint8)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out


def _referenced_frame(item: Dataset) -> int | None:
    for seq_name in ("DerivationImageSequence",):
        for der in item.get(seq_name, []):
            for src in der.get("SourceImageSequence", []):
                ref = src.get("ReferencedFrameNumber")
                if ref is not None:
                    return int(ref if not isinstance(ref, list | pydicom.multival.MultiValue) else ref[0])
    for fc in item.get("FrameContentSequence", []):
        if "TemporalPositionIndex" in fc:
            return int(fc.TemporalPositionIndex)
    return None


def class_maps_from_seg(path: Path, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(labels (frames, rows, cols) uint8, has_map (frames,) bool) from a stored SEG."""
    try:
        seg = pydicom.dcmread(path)
        pix = np.asarray(seg.pixel_array)
    except Exception as exc:
        raise PreviewUnavailable("segmentation unreadable") from exc
    n, rows, cols = shape
    if pix.ndim == 2:
        pix = pix[None]
    if pix.shape[1:] != (rows, cols):
        raise PreviewUnavailable("segmentation does not match the source size")
    labels = np.zeros(shape, dtype=np.uint8)
    has = np.zeros(n, dtype=bool)
    labelmap = str(seg.get("SegmentationType", "BINARY")) == "LABELMAP"
    groups = seg.get("PerFrameFunctionalGroupsSequence", [])
    for i in range(min(len(groups), pix.shape[0])):
        item = groups[i]
        ref = _referenced_frame(item)
        if ref is None and n == 1:
            ref = 1
        if ref is None or not 1 <= ref <= n:
            continue
        f = ref - 1
        has[f] = True
        if labelmap:
            labels[f] = np.where(pix[i] > 0, pix[i], labels[f]).astype(np.uint8)
        else:
            ids = item.get("SegmentIdentificationSequence", [])
            if not ids:
                continue
            number = int(ids[0].ReferencedSegmentNumber)
            labels[f][pix[i] > 0] = number
    return labels, has


def overlay(gray: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """RGB uint8 of one frame with the class map blended in."""
    rgb = np.repeat(gray[..., None], 3, axis=2).astype(np.float32)
    if labels is not None:
        mask = (labels > 0)[..., None]
        rgb = np.where(mask, rgb * (1 - ALPHA) + _LUT[labels] * ALPHA, rgb)
    return rgb.astype(np.uint8)


@dataclass(frozen=True)
class Caption:
    score: int | None  # None: the cine is not gradable, ``reason`` says why
    model: str
    has_overlay: bool
    reason: str | None = None


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _with_legend(img: Image.Image, caption: Caption, frame_text: str) -> Image.Image:
    font = _font()
    line_h = 18
    per_row = 3
    rows = (len(CLASSES) + per_row - 1) // per_row
    panel_h = line_h * (rows + 2) + 6
    out = Image.new("RGB", (img.width, img.height + panel_h), (20, 20, 20))
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    y = img.height + 4
    verdict = f"Score {caption.score}" if caption.score is not None else f"Not gradable ({caption.reason})"
    d.text((6, y), f"{verdict}  {frame_text}", fill=(255, 255, 255), font=font)
    y += line_h
    col_w = max(img.width // per_row, 1)
    if caption.has_overlay:
        for i, (_n, (label, rgb)) in enumerate(CLASSES.items()):
            x = 6 + (i % per_row) * col_w
            yy = y + (i // per_row) * line_h
            d.rectangle((x, yy + 3, x + 11, yy + 14), fill=rgb)
            d.text((x + 16, yy), label, fill=(230, 230, 230), font=font)
    else:
        d.text((6, y), "no segmentation stored for this result", fill=(230, 230, 230), font=font)
    y = img.height + panel_h - line_h
    d.text((6, y), f"{caption.model} - not for primary diagnosis", fill=(160, 160, 160), font=font)
    return out


MIN_WIDTH = 360  # narrower images are enlarged so the legend stays legible


def _scaled(frame: np.ndarray, max_width: int) -> Image.Image:
    img = Image.fromarray(frame, "RGB")
    width = min(max(img.width, MIN_WIDTH), max(max_width, MIN_WIDTH))
    if width != img.width:
        h = max(1, round(img.height * width / img.width))
        img = img.resize((width, h), Image.Resampling.BILINEAR)
    return img


def render(
    kind: Kind,
    frames: np.ndarray,
    labels: np.ndarray | None,
    has_map: np.ndarray | None,
    key_frame: int,
    caption: Caption,
    *,
    max_frames: int,
    max_width: int,
    frame_ms: float,
) -> bytes:
    """Encode the preview: PNG of the key frame or an animated GIF/WebP of the cine."""
    n = frames.shape[0]
    buf = io.BytesIO()
    if kind == "png":
        k = min(max(key_frame, 0), n - 1)
        lab = labels[k] if labels is not None and (has_map is None or has_map[k]) else None
        img = _with_legend(_scaled(overlay(frames[k], lab), max_width), caption, f"key frame {k + 1}/{n}")
        img.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()
    candidates = np.arange(n)
    if labels is not None and has_map is not None and has_map.any():
        candidates = np.flatnonzero(has_map)  # only frames that have a class map
    step = max(1, int(np.ceil(len(candidates) / max_frames)))
    chosen = candidates[::step]
    images = []
    for f in chosen:
        lab = labels[f] if labels is not None else None
        images.append(
            _with_legend(_scaled(overlay(frames[f], lab), max_width), caption, f"frame {f + 1}/{n}")
        )
    duration = max(20, round(frame_ms * step))
    if kind == "gif":
        pal = [im.convert("P", palette=Image.Palette.ADAPTIVE, colors=255) for im in images]
        pal[0].save(buf, format="GIF", save_all=True, append_images=pal[1:], duration=duration, loop=0)
    else:
        images[0].save(
            buf,
            format="WEBP",
            save_all=True,
            append_images=images[1:],
            duration=duration,
            loop=0,
            quality=75,
            method=3,
        )
    return buf.getvalue()


def frame_time_ms(path: Path) -> float:
    """Display interval of the cine from FrameTime or CineRate; 33 ms (30 fps) if absent."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:
        return 33.0
    try:
        if "FrameTime" in ds and float(ds.FrameTime) > 0:
            return float(ds.FrameTime)
        if "CineRate" in ds and float(ds.CineRate) > 0:
            return 1000.0 / float(ds.CineRate)
    except (TypeError, ValueError):
        pass
    return 33.0


def cache_path(root: Path, result_id: int, kind: Kind, max_frames: int, max_width: int) -> Path:
    return root / "previews" / f"r{result_id}-v{RENDER_VERSION}-{max_frames}x{max_width}.{kind}"


def write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
