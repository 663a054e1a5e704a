"""Preview images for people who would rather look than read: key frame PNG, animated GIF/WebP.

Rendered once by the worker when it saves a result, next to the SEG, and stored in object
storage; the API only serves the stored files (it never decodes pixels). The class maps are read
back from the SEG itself, frame by frame through the per-frame functional groups (each SEG frame
names its segment and its source frame), so a preview shows exactly what PACS receive; highdicom
cannot parse SEGs of multi-frame ultrasound without a patient coordinate system, hence pydicom.
Colours and names come from the one segment table (service/core/segments.py) and the blending is
the overlay SC's. No patient data is drawn on the images.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from service.core.logs import ctx
from service.core.segments import SEGMENTS
from service.core.settings import Settings
from service.core.storage import ObjectStore
from workers.domain import Analysis
from workers.preprocess import InputError, decode_frames, frame_rate
from workers.write_dicom.overlay import OverlayOptions, blend

Kind = Literal["png", "gif", "webp"]
KINDS: tuple[Kind, ...] = get_args(Kind)
#: Opacity of the class colours: the burned-in overlay SC's, so both pictures look alike.
ALPHA = OverlayOptions.alpha
MIN_WIDTH = 360  # narrower images are enlarged so the legend stays legible
DEFAULT_FRAME_MS = 33.0  # 30 fps when the source states no timing

log = logging.getLogger(__name__)


class PreviewUnavailable(Exception):
    """The source or its SEG cannot be rendered (undecodable pixels, SEG of another size)."""


@dataclass(frozen=True)
class Caption:
    """What the legend panel says under the image."""

    score: int | None  # None: the cine is not gradable, ``reason`` says why
    model: str
    reason: str | None = None

    @classmethod
    def of(cls, analysis: Analysis) -> Caption:
        f, m = analysis.findings, analysis.model
        return cls(f.reported_score, f"{m.name} {m.version}", f.ungradable_reason)


def _referenced_frame(item: Dataset) -> int | None:
    for der in item.get("DerivationImageSequence", []):
        for src in der.get("SourceImageSequence", []):
            ref = src.get("ReferencedFrameNumber")
            if ref is not None:
                return int(ref if not isinstance(ref, list | pydicom.multival.MultiValue) else ref[0])
    for fc in item.get("FrameContentSequence", []):
        if "TemporalPositionIndex" in fc:
            return int(fc.TemporalPositionIndex)
    return None


def class_maps_from_seg(
    seg: Dataset, shape: tuple[int, int, int], frames: Sequence[int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(labels, has_map (n,) bool) from a SEG (BINARY or LABELMAP). ``labels`` holds the class
    maps of the 0-based source ``frames`` (all n by default), in that order; only the SEG frames
    that refer to them are decoded, so a long cine's previews never unpack the whole SEG.
    ``has_map`` marks the source frames the SEG segmented (all, or every n-th with ``max_frames``)."""
    n, rows, cols = shape
    if (int(seg.get("Rows", 0) or 0), int(seg.get("Columns", 0) or 0)) != (rows, cols):
        raise PreviewUnavailable("segmentation does not match the source size")
    wanted = list(range(n)) if frames is None else [int(f) for f in frames]
    slot = {f: i for i, f in enumerate(wanted)}
    labels = np.zeros((len(wanted), rows, cols), dtype=np.uint8)
    has = np.zeros(n, dtype=bool)
    labelmap = str(seg.get("SegmentationType", "BINARY")) == "LABELMAP"
    groups = seg.get("PerFrameFunctionalGroupsSequence", [])
    count = min(len(groups), int(seg.get("NumberOfFrames", 1) or 1))
    steps: set[int] = set()  # source frames per temporal position: the writer's subsampling
    try:
        for i in range(count):
            item = groups[i]
            ref = _referenced_frame(item)
            if ref is None and n == 1:
                ref = 1
            if ref is None or not 1 <= ref <= n:
                continue
            f = ref - 1
            has[f] = True
            content = item.get("FrameContentSequence", [None])[0]
            if content is not None and int(content.get("TemporalPositionIndex", 1) or 1) > 1:
                steps.add(f // (int(content.TemporalPositionIndex) - 1))
            if f not in slot:
                continue
            plane = _seg_frame(seg, i, rows, cols)
            if labelmap:
                labels[slot[f]] = np.where(plane > 0, plane, labels[slot[f]]).astype(np.uint8)
            elif ids := item.get("SegmentIdentificationSequence", []):
                labels[slot[f]][plane > 0] = int(ids[0].ReferencedSegmentNumber)
    except PreviewUnavailable:
        raise
    except Exception as exc:
        raise PreviewUnavailable("segmentation unreadable") from exc
    if not labelmap and has.any():
        # A BINARY SEG has no frame where a segment is empty; a source frame the writer selected
        # (every ``step``-th) and found empty is still segmented.
        has[:: steps.pop() if len(steps) == 1 else 1] = True
    return labels, has


def _seg_frame(seg: Dataset, index: int, rows: int, cols: int) -> np.ndarray:
    """Frame ``index`` (0-based) of the SEG: bit-packed BINARY frames are cut from the pixel data
    directly (they are packed back to back, PS3.5 8.1.1), anything else through pydicom."""
    meta = getattr(seg, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if int(seg.get("BitsAllocated", 8)) == 1 and (syntax is None or not syntax.is_compressed):
        size = rows * cols
        first = index * size
        chunk = np.frombuffer(seg.PixelData, np.uint8, count=(first % 8 + size + 7) // 8, offset=first // 8)
        bits = np.unpackbits(chunk, bitorder="little")[first % 8 : first % 8 + size]
        if bits.size != size:
            raise PreviewUnavailable("segmentation pixel data is too short")
        return bits.reshape(rows, cols)
    return np.asarray(pixel_array(seg, index=index)).reshape(rows, cols)


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=13)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _with_legend(img: Image.Image, caption: Caption, has_overlay: bool, frame_text: str) -> Image.Image:
    font = _font()
    line_h = 18
    per_row = 3
    rows = (len(SEGMENTS) + per_row - 1) // per_row
    panel_h = line_h * (rows + 2) + 6
    out = Image.new("RGB", (img.width, img.height + panel_h), (20, 20, 20))
    out.paste(img, (0, 0))
    d = ImageDraw.Draw(out)
    y = img.height + 4
    verdict = f"Score {caption.score}" if caption.score is not None else f"Not gradable ({caption.reason})"
    d.text((6, y), f"{verdict}  {frame_text}", fill=(255, 255, 255), font=font)
    y += line_h
    col_w = max(img.width // per_row, 1)
    if has_overlay:
        for i, row in enumerate(SEGMENTS):
            x = 6 + (i % per_row) * col_w
            yy = y + (i // per_row) * line_h
            d.rectangle((x, yy + 3, x + 11, yy + 14), fill=row.rgb)
            d.text((x + 16, yy), row.label, fill=(230, 230, 230), font=font)
    else:
        d.text((6, y), "no segmentation stored for this result", fill=(230, 230, 230), font=font)
    y = img.height + panel_h - line_h
    d.text((6, y), f"{caption.model} - not for primary diagnosis", fill=(160, 160, 160), font=font)
    return out


def _target_size(rows: int, cols: int, max_width: int) -> tuple[int, int]:
    """(width, height) of the images: at most ``max_width`` wide, at least MIN_WIDTH."""
    width = min(max(cols, MIN_WIDTH), max(max_width, MIN_WIDTH))
    return width, max(1, round(rows * width / cols))


def _resized(planes: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """``planes`` (n, rows, cols) uint8 resized to ``size`` (width, height), each plane alone."""
    if planes.shape[2:0:-1] == size:
        return planes
    return np.stack([np.asarray(Image.fromarray(p).resize(size, resample)) for p in planes])


def animation_frames(n: int, has_map: np.ndarray | None, max_frames: int) -> tuple[np.ndarray, int]:
    """Frames an animation shows and the subsampling step: those the SEG covers (all when it covers
    none or there is no SEG), at most ``max_frames``, evenly subsampled."""
    candidates = np.arange(n)
    if has_map is not None and has_map.any():
        candidates = np.flatnonzero(has_map)  # only frames that have a class map
    step = max(1, int(np.ceil(len(candidates) / max_frames)))
    return candidates[::step], step


def render(
    kind: Kind,
    shown: dict[int, Image.Image],
    n: int,
    animated: np.ndarray,
    step: int,
    key_frame: int,
    caption: Caption,
    *,
    has_overlay: bool,
    frame_ms: float,
) -> bytes:
    """Encode one preview: PNG of the key frame or an animated GIF/WebP of the ``animated`` frames.

    ``shown`` maps frame index to the scaled RGB image with the overlay blended in, for the key
    frame and every animated frame (of ``n``); ``step`` is the subsampling of the animation.
    """
    buf = io.BytesIO()
    if kind == "png":
        k = min(max(key_frame, 0), n - 1)
        img = _with_legend(shown[k], caption, has_overlay, f"key frame {k + 1}/{n}")
        img.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()
    images = [_with_legend(shown[int(f)], caption, has_overlay, f"frame {f + 1}/{n}") for f in animated]
    duration = max(20, round(frame_ms * step))
    if kind == "gif":
        # Fast octree palettes: median cut took ~15 ms a frame (512 px wide) for grey + 6 colours.
        pal = [im.quantize(colors=255, method=Image.Quantize.FASTOCTREE) for im in images]
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
            method=0,  # the fastest effort: method 3 took ~3x as long (0.56 vs 0.19 s for 35 frames)
        )
    return buf.getvalue()


def render_previews(
    source: Dataset,
    seg: Dataset | None,
    caption: Caption,
    *,
    key_frame: int,
    max_frames: int,
    max_width: int,
) -> dict[Kind, bytes]:
    """Every preview the API offers, of ``source`` with the class maps of its ``seg`` (if any).

    Only the frames the previews show (the key frame and at most ``max_frames`` more) are blended
    and scaled: a long cine costs its decoding, not a colour copy of every frame.
    """
    n = int(source.get("NumberOfFrames", 1) or 1)
    shape = (n, int(source.get("Rows", 0) or 0), int(source.get("Columns", 0) or 0))
    has = class_maps_from_seg(seg, shape, [])[1] if seg is not None else None
    animated, step = animation_frames(n, has, max_frames)
    picked = np.array(sorted({min(max(key_frame, 0), n - 1), *animated.tolist()}))
    try:  # only the frames shown: a long cine's previews never hold the whole cine
        frames = decode_frames(source, picked.tolist())
    except InputError as exc:
        raise PreviewUnavailable("source pixels could not be decoded") from exc
    # Scale first, then colour: the grey frames bilinear, the class maps nearest (a class is never
    # averaged into another), so only the shown pixels of the shown frames are blended.
    size = _target_size(frames.shape[1], frames.shape[2], max_width)
    grey = _resized(frames, size, Image.Resampling.BILINEAR)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if seg is not None:
        labels, _ = class_maps_from_seg(seg, shape, picked.tolist())
        rgb = blend(rgb, _resized(labels, size, Image.Resampling.NEAREST), ALPHA)
    shown = {int(f): Image.fromarray(rgb[i], "RGB") for i, f in enumerate(picked)}
    rate = frame_rate(source)
    frame_ms = 1000.0 / rate if rate else DEFAULT_FRAME_MS
    return {
        kind: render(
            kind, shown, n, animated, step, key_frame, caption, has_overlay=seg is not None, frame_ms=frame_ms
        )
        for kind in KINDS
    }


@dataclass(frozen=True)
class StoredPreviews:
    """Storage keys of the rendered previews, or (all None) ``error``: why there are none."""

    png: str | None = None
    gif: str | None = None
    webp: str | None = None
    error: str | None = None


def store_previews(
    store: ObjectStore,
    source: Dataset,
    seg: Dataset | None,
    caption: Caption,
    *,
    key_frame: int,
    settings: Settings,
) -> StoredPreviews:
    """Render and store the previews; a preview that cannot be rendered does not fail the job,
    the API then answers 409 with ``error``."""
    try:
        images = render_previews(
            source,
            seg,
            caption,
            key_frame=key_frame,
            max_frames=settings.preview_max_frames,
            max_width=settings.preview_max_width,
        )
    except PreviewUnavailable as exc:
        log.warning("previews not rendered", extra=ctx(reason=str(exc)))
        return StoredPreviews(error=str(exc))
    keys = {kind: store.put_bytes([data], suffix=kind)[0] for kind, data in images.items()}
    return StoredPreviews(png=keys["png"], gif=keys["gif"], webp=keys["webp"])
