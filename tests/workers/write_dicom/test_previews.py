"""Previews rendered by the worker: class maps read back from the real SEG writer, colours and
names from the one segment table (the SEG's own), every kind the API serves, and storage."""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from highdicom.color import CIELabColor
from PIL import Image
from pydicom.dataset import Dataset

from service.core.segments import SEGMENTS
from service.core.settings import Settings
from service.core.storage import FilesystemStore
from tests.factories import us_cine
from workers.domain import Analysis, ModelInfo, VideoFindings
from workers.write_dicom.common import SeriesInfo
from workers.write_dicom.previews import (
    ALPHA,
    MIN_WIDTH,
    Caption,
    class_maps_from_seg,
    render_previews,
    store_previews,
)
from workers.write_dicom.seg import SegOptions, build_seg

FRAMES, ROWS, COLS = 4, 48, 64
CAPTION = Caption(score=2, model="lusnet 1")


def _labels() -> np.ndarray:
    """Frames 0, 1 and 3: every class in its own band of columns; frame 2 shows nothing."""
    labels = np.zeros((FRAMES, ROWS, COLS), dtype=np.uint8)
    for f in (0, 1, 3):
        for i, row in enumerate(SEGMENTS):
            labels[f, 4:44, 2 + 10 * i : 12 + 10 * i] = row.number
    return labels


def _worker_seg(src: Dataset, labels: np.ndarray, **options: Any) -> Dataset:
    findings = VideoFindings(
        score=2, frame_scores=(2, 1, 0, 2), key_frame=0, b_line_fraction=0.2, b_line_count=2, bla_score=0.1,
        consolidation=False, effusion=False, consolidation_area_mm2=0.0, effusion_area_mm2=0.0,
        pleura_irregular=False,
    )  # fmt: skip
    analysis = Analysis(src.SOPInstanceUID, FRAMES, findings, labels, ModelInfo("lusnet", "1", "ab" * 32), {})
    return build_seg(
        src, analysis, SeriesInfo("1.2.3.4.5", "1.2.3.4.6", 100, "seg"),
        options=SegOptions(**options),
        uid_root="1.2.826.0.1.3680043.10.1", now=dt.datetime.now(dt.UTC),
    )  # fmt: skip


@pytest.mark.parametrize(
    "options", [{}, {"segmentation_type": "LABELMAP"}, {"segmentation_type": "LABELMAP", "compress": True}]
)
def test_class_maps_read_back_from_the_workers_seg(tmp_path: Path, options: dict[str, Any]) -> None:
    """The overlay reader against the real SEG writer (BINARY and LABELMAP, also RLE), both as
    stored and as the worker holds it in memory when it renders."""
    src = us_cine(np.zeros((FRAMES, ROWS, COLS), dtype=np.uint8))
    labels = _labels()
    seg = _worker_seg(src, labels, **options)
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    for ds in (pydicom.dcmread(path), seg):
        got, has = class_maps_from_seg(ds, labels.shape)
        assert has.all()  # the SEG covers every frame, also the one without findings
        np.testing.assert_array_equal(got, labels)


def test_colours_and_legend_are_the_segs(tmp_path: Path) -> None:
    """On a black cine each class is drawn in the colour the SEG recommends for its segment, and
    the legend swatches are those colours in segment order."""
    src = us_cine(np.zeros((FRAMES, ROWS, COLS), dtype=np.uint8))
    seg = _worker_seg(src, _labels())
    seg_rgb = {
        int(item.SegmentNumber): CIELabColor.from_dicom_value(item.RecommendedDisplayCIELabValue).to_rgb()
        for item in seg.SegmentSequence
    }
    assert sorted(seg_rgb) == [row.number for row in SEGMENTS]
    png = render_previews(src, seg, CAPTION, key_frame=0, max_frames=48, max_width=512)["png"]
    img = Image.open(io.BytesIO(png)).convert("RGB")
    scale = img.width / COLS
    assert img.width == MIN_WIDTH
    for i, row in enumerate(SEGMENTS):
        want = seg_rgb[row.number]
        assert all(abs(a - b) <= 1 for a, b in zip(row.rgb, want, strict=True)), row.label
        drawn = img.getpixel((int((7 + 10 * i) * scale), int(24 * scale)))
        assert all(abs(d - round(ALPHA * c)) <= 2 for d, c in zip(drawn, want, strict=True)), row.label
        col_w = img.width // 3
        swatch = img.getpixel((6 + (i % 3) * col_w + 5, round(ROWS * scale) + 4 + 18 + (i // 3) * 18 + 8))
        assert all(abs(s - c) <= 1 for s, c in zip(swatch, want, strict=True)), row.label


def test_every_kind_the_api_serves(tmp_path: Path) -> None:
    ramp = np.tile(np.linspace(40, 200, COLS, dtype=np.uint8), (FRAMES, ROWS, 1))
    src = us_cine(ramp)
    seg = _worker_seg(src, _labels())
    out = render_previews(src, seg, CAPTION, key_frame=1, max_frames=2, max_width=512)
    assert sorted(out) == ["gif", "png", "webp"]
    assert Image.open(io.BytesIO(out["png"])).format == "PNG"
    for kind in ("gif", "webp"):
        anim = Image.open(io.BytesIO(out[kind]))
        assert anim.format == kind.upper() and anim.n_frames == 2  # 4 frames with a map, at most 2 shown
        anim.seek(1)
        anim.load()
        assert anim.info["duration"] == 80  # FrameTime 40 ms, every second frame
    plain = render_previews(src, None, CAPTION, key_frame=0, max_frames=48, max_width=100)
    gif = Image.open(io.BytesIO(plain["gif"]))
    assert gif.n_frames == FRAMES and gif.width == MIN_WIDTH  # no SEG: every frame, enlarged


def test_store_previews_writes_images_or_says_why_not(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path / "storage")
    settings = Settings(data_dir=tmp_path)
    src = us_cine(np.full((FRAMES, ROWS, COLS), 90, dtype=np.uint8))
    stored = store_previews(store, src, _worker_seg(src, _labels()), CAPTION, key_frame=0, settings=settings)
    assert stored.error is None
    for kind, key in (("png", stored.png), ("gif", stored.gif), ("webp", stored.webp)):
        assert key is not None and key.endswith(f".{kind}")
        assert Image.open(store.path(key)).format == kind.upper()
    src.PixelData = src.PixelData[:10]
    broken = store_previews(store, src, None, CAPTION, key_frame=0, settings=settings)
    assert (broken.png, broken.gif, broken.webp) == (None, None, None)
    assert broken.error == "source pixels could not be decoded"
    good = us_cine(np.full((FRAMES, ROWS, COLS), 90, dtype=np.uint8))
    small = us_cine(np.zeros((FRAMES, ROWS // 2, COLS), dtype=np.uint8))
    seg = _worker_seg(small, _labels()[:, : ROWS // 2])
    mismatch = store_previews(store, good, seg, CAPTION, key_frame=0, settings=settings)
    assert mismatch.error == "segmentation does not match the source size"


@pytest.mark.parametrize(
    "options", [{}, {"deflate": True}, {"segmentation_type": "LABELMAP", "compress": True}]
)
def test_class_maps_of_some_frames_are_those_of_the_whole_seg(
    tmp_path: Path, options: dict[str, Any]
) -> None:
    """Only the SEG frames of the frames asked for are decoded (a long cine's SEG is never
    unpacked whole); they equal the same frames read from the whole SEG."""
    src = us_cine(np.zeros((FRAMES, ROWS, COLS), dtype=np.uint8))
    labels = _labels()
    path = tmp_path / "seg.dcm"
    _worker_seg(src, labels, **options).save_as(path, enforce_file_format=True)
    seg = pydicom.dcmread(path)
    whole, has = class_maps_from_seg(seg, labels.shape)
    some, has_too = class_maps_from_seg(seg, labels.shape, [3, 0])
    np.testing.assert_array_equal(some, whole[[3, 0]])
    np.testing.assert_array_equal(has, has_too)
    assert class_maps_from_seg(seg, labels.shape, [])[0].shape == (0, ROWS, COLS)
