"""Sector detection on phantom cine with known geometry (and on BLUS when present); grid mappings."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from workers.preprocess import Grid, GridShape, InputError, Sector, detect_sector
from workers.preprocess.grid import scan_convert
from workers.training.phantom import make_cine

SHARED = Path(__file__).resolve().parents[3] / ".." / "shared"


def _convex() -> Sector:
    return Sector.convex(210.0, -120.0, 140.0, 420.0, -0.5, 0.5, 0.3)


def test_convex_fan_recovered_despite_burned_in_text() -> None:
    cine = make_cine(np.random.default_rng(3), n_frames=12, src=(320, 320), scenario="b_lines", kind="convex")
    frames = cine.frames.copy()
    cv2.putText(frames[0], "L1 12cm", (5, 310), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 255, 2)
    for f in frames[1:]:
        f[290:320, 0:110] = frames[0][290:320, 0:110]  # static text in every frame
    s, t = detect_sector(frames), cine.sector
    assert s.kind == "convex"
    assert abs(s.theta0 - t.theta0) < 0.06 and abs(s.theta1 - t.theta1) < 0.06
    assert abs(s.apex_x - t.apex_x) < 12 and abs(s.apex_y - t.apex_y) < 25


def test_linear_rectangle_recovered() -> None:
    cine = make_cine(np.random.default_rng(4), n_frames=8, src=(240, 300), scenario="normal", kind="linear")
    s, t = detect_sector(cine.frames), cine.sector
    assert s.kind == "linear"
    assert abs(s.x0 - t.x0) < 6 and abs(s.x1 - t.x1) < 6


def test_blank_cine_has_no_sector() -> None:
    with pytest.raises(InputError):
        detect_sector(np.zeros((4, 64, 64), np.uint8))


def test_region_sequence_gives_spacing() -> None:
    from workers.preprocess.wrap import frames_to_dataset

    cine = make_cine(np.random.default_rng(5), n_frames=6, src=(200, 200), kind="linear")
    ds = frames_to_dataset(cine.frames, mm_per_pixel=0.25)
    assert detect_sector(cine.frames, ds).mm_per_pixel == pytest.approx(0.25)


def test_grid_round_trip_of_labels() -> None:
    """grid -> scanner -> grid -> source reproduces the class map the scanner would draw."""
    shape = GridShape(64, 96)
    rng = np.random.default_rng(0)
    lab = np.repeat(rng.integers(0, 7, (8, 12)), 8, axis=0).repeat(8, axis=1).astype(np.uint8)
    sector, src = _convex(), (360, 420)
    cart = scan_convert(lab, sector, src, cv2.INTER_NEAREST)
    grid = Grid(sector, src, shape)
    back = grid.to_grid(cart[None], cv2.INTER_NEAREST)[0]
    assert (back == lab).mean() > 0.97
    src_lab = grid.to_source(lab[None])[0]
    inside = cart > 0
    assert (src_lab[inside] == cart[inside]).mean() > 0.95
    assert src_lab[0, 0] == 0  # outside the fan


def test_convex_spacing_widens_with_depth() -> None:
    sp = Grid(_convex(), (360, 420), GridShape(64, 96)).spacing()
    assert sp.row_mm == pytest.approx((420 - 140) / 63 * 0.3)
    assert sp.col_mm[-1] > 2.5 * sp.col_mm[0]


@pytest.mark.skipif(not (SHARED / "datasets" / "blus-dev").is_dir(), reason="../shared not present")
def test_blus_video_has_convex_fan() -> None:
    from workers.training.evaluate import read_mp4_gray

    frames = read_mp4_gray(SHARED / "datasets" / "blus-dev" / "lus_videos" / "patient_10_L1.mp4")
    s = detect_sector(frames)
    assert s.kind == "convex"
    assert s.theta0 == pytest.approx(-0.6, abs=0.05) and s.theta1 == pytest.approx(0.59, abs=0.05)
