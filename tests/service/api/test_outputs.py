"""SEG/SR downloads and previews (PNG key frame, animated GIF/WebP) with the overlay read from the SEG:
the worker renders and stores them (seeded here as it does), the API only serves the stored files."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from PIL import Image

from tests.service.api.conftest import COLS, FRAMES, ROWS, Api, render_previews, seed_study
from workers.write_dicom.previews import MIN_WIDTH


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
    assert img.width == MIN_WIDTH and img.height > ROWS * scale + 40  # image + legend panel
    inside = img.getpixel((int(15 * scale), int(25 * scale)))  # B-line box (cols 10-19, rows 10-39)
    outside = img.getpixel((int(40 * scale), int(25 * scale)))
    assert _reddish(inside) and not _reddish(outside)
    assert abs(outside[0] - outside[1]) < 8 and abs(outside[1] - outside[2]) < 8  # untouched gray
    cached = list(api.store.root.rglob("*.png"))  # rendered once, by the worker, into object storage
    assert len(cached) == 1 and cached[0].read_bytes() == r.content
    again = api.get(url, headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert api.get(url).content == r.content  # served from the cache
    assert api.client.get(url).status_code == 401
    assert api.get("/api/v1/results/424242/preview.png").status_code == 404


@pytest.mark.parametrize("kind", ["gif", "webp"])
def test_animated_preview(sqlite_api: Api, tmp_path: Path, kind: str) -> None:
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], seg_frames=[0, 2])  # every 2nd frame
    r = sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/cine.{kind}")
    assert r.status_code == 200 and r.headers["content-type"] == f"image/{kind}"
    img = Image.open(io.BytesIO(r.content))
    assert img.format == kind.upper() and img.is_animated
    assert img.n_frames == 2  # only the frames the SEG segmented
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
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], with_seg=False, previews=False)
    for p in sqlite_api.store.root.rglob("*.dcm"):  # pixels the worker cannot decode
        ds = pydicom.dcmread(p)
        ds.PixelData = ds.PixelData[:10]
        ds.save_as(p)
    render_previews(sqlite_api, s.result_ids[0])
    r = sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/preview.png")
    assert r.status_code == 409 and r.json()["type"] == "urn:lusai:problem:preview-unavailable"


@pytest.mark.parametrize("url", ["preview.png", "cine.gif", "cine.webp"])
def test_result_analysed_before_previews_asks_for_a_rerun(sqlite_api: Api, tmp_path: Path, url: str) -> None:
    """Results from before migration 0006 have no previews: the API never renders, it says what to do."""
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)], previews=False)
    r = sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/{url}")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"
    assert (
        r.json()["type"] == "urn:lusai:problem:preview-not-rendered"
        and "re-run the job" in r.json()["detail"]
    )
    assert not list(sqlite_api.store.root.rglob(f"*.{url.rsplit('.', 1)[-1]}"))


def test_missing_preview_file_is_gone(sqlite_api: Api, tmp_path: Path) -> None:
    s = seed_study(sqlite_api, tmp_path, zones=[("LUS R1", 2)])
    url = f"/api/v1/results/{s.result_ids[0]}/cine.webp"
    etag = sqlite_api.get(url).headers["etag"]
    for p in sqlite_api.store.root.rglob("*.webp"):
        p.unlink()
    for headers in ({}, {"If-None-Match": etag}):
        gone = sqlite_api.get(url, headers=headers)
        assert gone.status_code == 410 and gone.json()["type"] == "urn:lusai:problem:gone"
    assert sqlite_api.get(f"/api/v1/results/{s.result_ids[0]}/preview.png").status_code == 200


def test_api_process_does_not_import_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from service.core.settings import Settings; from service.api.main import create_app; "
        "from service.core.runtime import Runtime; "
        f"create_app(Runtime.from_settings(Settings(data_dir={str(tmp_path)!r}))); "
        "assert not [m for m in sys.modules if m.split('.')[0] == 'workers'], 'the API imported workers'; "
        "import workers.write_dicom.previews; "  # and the worker's renderer stays light too
        "assert 'torch' not in sys.modules, 'torch imported'; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
