"""SEG/SR downloads and previews (PNG key frame, animated GIF/WebP) with the overlay read from the SEG."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from service.api import previews
from tests.api.conftest import COLS, FRAMES, ROWS, Api, class_maps, seed_study, source_frames
from tests.factories import us_cine


def test_seg_and_sr_download(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 2)])
    rid = s.result_ids[0]
    r = api.get(f"/api/v1/results/{rid}/seg")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/dicom"
    assert r.content == s.seg_bytes
    seg = pydicom.dcmread(io.BytesIO(r.content))
    assert seg.Modality == "SEG" and ".dcm" in r.headers["content-disposition"]
    sr = api.get(f"/api/v1/results/{rid}/sr")
    assert sr.status_code == 200 and pydicom.dcmread(io.BytesIO(sr.content)).Modality == "SR"
    detail = api.get(f"/api/v1/results/{rid}").json()
    assert detail["links"]["seg"] == f"/api/v1/results/{rid}/seg"
    assert api.client.get(f"/api/v1/results/{rid}/seg").status_code == 401


def test_download_problems(sqlite_api: Api, tmp_path: Path) -> None:
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    r = sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/seg")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    s2 = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)])
    body = sqlite_api.get(f"/api/v1/results/{s2.result_ids[0]}").json()
    seg_path = next(p for p in sqlite_api.store.root.rglob("*.dcm") if p.read_bytes() == s2.seg_bytes)
    seg_path.unlink()
    gone = sqlite_api.get(body["links"]["seg"])
    assert gone.status_code == 410 and gone.json()["type"] == "urn:lusai:problem:gone"


def _reddish(px: tuple[int, ...]) -> bool:
    r, g, b = px[:3]
    return r > g + 40 and r > b + 40


def test_png_preview_has_overlay_and_legend(api: Api, tmp_path: Path) -> None:
    s = seed_study(api, tmp_path, zones=[("LUS R1", 2)])
    url = f"/api/v1/results/{s.result_ids[0]}/preview.png"
    r = api.get(url)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content)).convert("RGB")
    scale = img.width / COLS
    assert img.width == previews.MIN_WIDTH and img.height > ROWS * scale + 40  # image + legend panel
    inside = img.getpixel((int(15 * scale), int(25 * scale)))  # B-line box (cols 10-19, rows 10-39)
    outside = img.getpixel((int(40 * scale), int(25 * scale)))
    assert _reddish(inside) and not _reddish(outside)
    assert abs(outside[0] - outside[1]) < 8 and abs(outside[1] - outside[2]) < 8  # untouched gray
    cached = list((api.settings.data_dir / "previews").glob("*.png"))
    assert len(cached) == 1 and cached[0].read_bytes() == r.content
    again = api.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert api.get(url).content == r.content  # served from the cache
    assert api.client.get(url).status_code == 401
    assert api.get("/api/v1/results/424242/preview.png").status_code == 404


@pytest.mark.parametrize("kind", ["gif", "webp"])
def test_animated_preview(sqlite_api: Api, tmp_path: Path, kind: str) -> None:
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], seg_frames=[0, 1, 3])
    r = sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/cine.{kind}")
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{kind}"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == kind.upper() and img.is_animated
    assert img.n_frames == 3  # only the frames that have a class map in the SEG
    img.seek(1)
    img.load()
    assert img.info.get("duration") == 40  # FrameTime of the source
    img.seek(0)
    first = img.convert("RGB")
    scale = first.width / COLS
    assert _reddish(first.getpixel((int(15 * scale), int(25 * scale))))


def test_preview_without_seg_has_no_overlay(sqlite_api: Api, tmp_path: Path) -> None:
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    r = sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/preview.png")
    assert r.status_code == 200
    img = Image.open(io.BytesIO(r.content)).convert("RGB")
    scale = img.width / COLS
    assert not _reddish(img.getpixel((int(15 * scale), int(25 * scale))))
    gif = Image.open(io.BytesIO(sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/cine.gif").content))
    assert gif.n_frames == FRAMES


def test_preview_of_unreadable_source_is_a_problem(sqlite_api: Api, tmp_path: Path) -> None:
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], with_seg=False)
    for p in sqlite_api.store.root.rglob("*.dcm"):
        p.write_bytes(b"not dicom")
    r = sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/preview.png")
    assert r.status_code == 409 and r.json()["type"] == "urn:lusai:problem:preview-unavailable"


@pytest.mark.parametrize(
    "options", [{}, {"segmentation_type": "LABELMAP"}, {"segmentation_type": "LABELMAP", "compress": True}]
)
def test_class_maps_read_back_from_the_workers_seg(tmp_path: Path, options: dict[str, object]) -> None:
    """The overlay reader against the real SEG writer (BINARY and LABELMAP, also RLE)."""
    from workers.domain import Analysis, ModelInfo, VideoFindings
    from workers.write_dicom.common import SeriesInfo
    from workers.write_dicom.seg import SegOptions, build_seg

    src = us_cine(source_frames())
    labels = class_maps()
    findings = VideoFindings(
        score=2, frame_scores=(2, 1, 0, 2), key_frame=0, b_line_fraction=0.2, b_line_count=2, bla_score=0.1,
        consolidation=False, effusion=False, consolidation_area_mm2=0.0, effusion_area_mm2=0.0,
        pleura_irregular=False,
    )  # fmt: skip
    analysis = Analysis(src.SOPInstanceUID, FRAMES, findings, labels, ModelInfo("lusnet", "1", "ab" * 32), {})
    seg = build_seg(
        src, analysis, SeriesInfo("1.2.3.4.5", "1.2.3.4.6", 100, "seg"),
        options=SegOptions(**options),  # type: ignore[arg-type]
        uid_root="1.2.826.0.1.3680043.10.1", now=dt.datetime.now(dt.UTC),
    )  # fmt: skip
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    got, has = previews.class_maps_from_seg(path, labels.shape)
    assert has.all()
    np.testing.assert_array_equal(got, labels)


def test_api_process_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from service.core.settings import Settings; from service.api.main import create_app; "
        f"create_app(Settings(data_dir={str(tmp_path)!r})); "
        "from service.api import previews; import workers.preprocess.decode; "
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
