"""Gradability: each reason on constructed findings and frames, and real cine through the Analyzer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.cli.model import _table
from tests.factories import noise_cine_file, us_cine
from workers.domain import FrameFindings
from workers.pipeline import Analyzer
from workers.preprocess.wrap import frames_to_dataset
from workers.score.gradability import REASONS, GradabilityConfig, assess, echo_fractions, structure
from workers.training.phantom import make_cine

ROWS = COLS = 128


def _frame(i: int, pleura: int = 90, shadow: int = 10, consolidation: float = 0.0) -> FrameFindings:
    return FrameFindings(
        index=i, score=0, pleura_scanlines=pleura, b_line_scanlines=0, b_line_fraction=0.0, b_line_count=0,
        confluent=False, pleura_irregularity=0.1, pleura_breaks=0, a_lines=True,
        consolidation_area_mm2=consolidation, consolidation_depth_mm=0.0, effusion_area_mm2=0.0,
        rib_shadow_scanlines=shadow,
    )  # fmt: skip


def _speckle(n: int, seed: int = 0, level: float = 60.0) -> np.ndarray:
    """Smooth random texture (neighbouring cells correlated, as speckle is) around ``level``."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(level, 25.0, (n, ROWS // 4, COLS // 4))
    fine = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2) + rng.normal(0, 3.0, (n, ROWS, COLS))
    return np.clip(fine, 0, 255).astype(np.uint8)


def test_normal_cine_is_gradable() -> None:
    g = assess(tuple(_frame(i) for i in range(20)), _speckle(20))
    assert g.gradable and g.reason is None and g.detail is None
    assert g.contact_fraction == g.structured_fraction == g.pleura_visible_fraction == 1.0
    assert g.pleura_width == pytest.approx(90 / COLS, abs=1e-3) and g.frames == 20
    assert set(g.measures()) == {
        "frames", "contact_fraction", "structured_fraction", "pleura_visible_fraction", "pleura_width",
        "rib_shadow_fraction", "lesion_frames",
    }  # fmt: skip


def test_too_few_frames() -> None:
    g = assess(tuple(_frame(i) for i in range(2)), _speckle(2))
    assert not g.gradable and g.reason == "too-few-frames" and "2 frame(s)" in str(g.detail)
    assert assess((_frame(0),), _speckle(1), GradabilityConfig(min_frames=1)).gradable


def test_no_contact_dark_frames() -> None:
    dark = np.random.default_rng(1).integers(2, 9, (20, ROWS, COLS)).astype(np.uint8)  # noise floor only
    frames = tuple(_frame(i) for i in range(20))  # even with a (hallucinated) pleura
    g = assess(frames, dark)
    assert g.reason == "no-contact" and g.contact_fraction == 0.0 and "0% of frames" in str(g.detail)
    # The odd blank frame of a recording is not a reason.
    mostly = _speckle(20)
    mostly[:3] = 0
    assert assess(frames, mostly).gradable
    # More than half the frames blank is.
    mostly[:11] = 0
    assert assess(frames, mostly).reason == "no-contact"


def test_noise_has_no_structure() -> None:
    noise = np.random.default_rng(2).integers(0, 256, (20, ROWS, COLS)).astype(np.uint8)
    assert float(np.max(structure(noise))) < 0.1 and float(np.min(structure(_speckle(5)))) > 0.6
    g = assess(tuple(_frame(i) for i in range(20)), noise)
    assert g.reason == "noise" and g.structured_fraction == 0.0 and g.contact_fraction == 1.0


def test_no_pleura_and_rib_shadow() -> None:
    img = _speckle(20)
    no_pleura = tuple(_frame(i, pleura=5 if i > 0 else 60, shadow=10) for i in range(20))
    g = assess(no_pleura, img)
    assert g.reason == "no-pleura" and g.pleura_visible_fraction == 0.05
    ribs = tuple(_frame(i, pleura=0, shadow=100) for i in range(20))
    g = assess(ribs, img)
    assert g.reason == "rib-shadow" and g.rib_shadow_fraction == pytest.approx(100 / COLS, abs=1e-3)
    # A consolidation is graded without a visible pleural line (lobar consolidation scores 3).
    lobar = tuple(_frame(i, pleura=0, shadow=0, consolidation=1500.0) for i in range(20))
    g = assess(lobar, img)
    assert g.gradable and g.lesion_frames == 20
    # The pleura seen on 10% of frames is enough (the 1% rule scores from few frames too).
    some = tuple(_frame(i, pleura=60 if i < 2 else 0) for i in range(20))
    assert assess(some, img).gradable


def test_echo_fractions_ignore_cells_outside_the_image() -> None:
    img = _speckle(3, level=80)
    img[:, :, :40] = 0  # a fan clipped by the image border: never imaged
    assert float(echo_fractions(img, 20).min()) > 0.9
    assert echo_fractions(np.zeros((2, 8, 8), np.uint8), 20).tolist() == [0.0, 0.0]


def test_mismatched_input_is_refused() -> None:
    with pytest.raises(ValueError, match="do not match"):
        assess(tuple(_frame(i) for i in range(3)), _speckle(4))


def test_every_reason_has_a_meaning() -> None:
    assert set(REASONS) == {"too-few-frames", "no-contact", "noise", "rib-shadow", "no-pleura"}


# --- through the Analyzer on DICOM ---------------------------------------------------------------


@pytest.fixture(scope="module")
def analyzer() -> Analyzer:
    return Analyzer(device="cpu")


def test_noise_cine_is_not_gradable(analyzer: Analyzer, tmp_path: Path) -> None:
    path = noise_cine_file(tmp_path / "noise.dcm", frames=6, rows=200, cols=240)
    a = analyzer.analyze_file(path)
    assert not a.findings.gradable and a.findings.ungradable_reason == "noise"
    js = a.to_json()
    assert js["score"] is None and js["gradable"] is False and js["reason"] == "noise"
    assert "speckle structure" in js["reason_detail"] and js["quality"]["structured_fraction"] == 0.0
    assert a.findings.frame_scores and a.labels.shape == (6, 200, 240)  # overlays are still produced
    table = _table([("noise.dcm", js)])
    assert "not gradable (noise)" in "".join(str(c) for col in table.columns for c in col._cells)


def test_probe_in_the_air_is_not_gradable(analyzer: Analyzer) -> None:
    """A fan with only the noise floor inside (no gel, probe lifted): the sector is found, no echoes."""
    c = make_cine(np.random.default_rng(2), n_frames=6, src=(300, 300), scenario="normal", kind="convex")
    inside = c.frames.max(axis=0) > 0
    floor = np.random.default_rng(0).integers(3, 9, c.frames.shape)
    ds = frames_to_dataset(
        np.where(inside[None], floor, 0).astype(np.uint8), mm_per_pixel=c.sector.mm_per_pixel
    )
    js = analyzer.analyze(ds).to_json()
    assert (js["score"], js["gradable"], js["reason"]) == (None, False, "no-contact")


def test_phantom_lung_stays_gradable(analyzer: Analyzer) -> None:
    for scenario in ("normal", "lobar"):
        c = make_cine(np.random.default_rng(2), n_frames=6, src=(300, 300), scenario=scenario, kind="convex")
        js = analyzer.analyze(frames_to_dataset(c.frames, mm_per_pixel=c.sector.mm_per_pixel)).to_json()
        assert js["gradable"] is True and js["reason"] is None and isinstance(js["score"], int)


def test_still_image_is_not_gradable(analyzer: Analyzer) -> None:
    c = make_cine(np.random.default_rng(3), n_frames=3, src=(300, 300), scenario="normal", kind="convex")
    a = analyzer.analyze(us_cine(c.frames[:1]))
    assert (a.to_json()["score"], a.to_json()["reason"]) == (None, "too-few-frames")
    assert a.findings.reported_score is None and isinstance(a.findings.score, int)  # rule ran, not reported
