"""Refinement: lung findings only below the pleura, consolidations attached, B-lines erase A-lines."""

from __future__ import annotations

import numpy as np

from service.core.segments import SegmentClass as C
from workers.infer.refine import RefineConfig, horizontal_structure, pleura_depth, refine

ROWS, COLS, PLEURA = 96, 80, 20


def _labels() -> np.ndarray:
    m = np.zeros((1, ROWS, COLS), np.uint8)
    m[0, PLEURA : PLEURA + 2, :] = C.PLEURAL_LINE
    return m


def _lung_image(bands_in: slice) -> np.ndarray:
    """Uniform haze below the pleura, horizontal reverberation bands only in ``bands_in`` columns."""
    rng = np.random.default_rng(0)
    img = np.full((ROWS, COLS), 60.0) + rng.normal(0, 3, (ROWS, COLS))
    img[PLEURA : PLEURA + 2] = 200
    for k in (2, 3, 4):
        row = k * PLEURA
        if row + 2 < ROWS:
            img[row : row + 2, bands_in] = 160
    return np.clip(img, 1, 255).astype(np.uint8)[None]


def test_findings_above_the_pleura_are_chest_wall() -> None:
    m = _labels()
    m[0, 5:12, 10:20] = C.CONSOLIDATION
    m[0, 3:8, 40:50] = C.B_LINE
    m[0, 40:60, 30:40] = C.B_LINE
    out = refine(np.full(m.shape, 80, np.uint8), m, RefineConfig(b_line_max_structure=0))
    assert not np.isin(out[0, : PLEURA - 2], [C.CONSOLIDATION, C.B_LINE]).any()
    assert (out[0, 40:60, 30:40] == C.B_LINE).all()  # below the pleura: kept
    assert m[0, 5, 10] == C.CONSOLIDATION  # input untouched


def test_consolidation_must_reach_the_pleura_or_an_effusion() -> None:
    m = _labels()
    m[0, PLEURA + 2 : PLEURA + 12, 5:15] = C.CONSOLIDATION  # subpleural: kept
    m[0, 60:70, 40:50] = C.CONSOLIDATION  # floating deep in aerated lung: dropped
    m[0, PLEURA + 2 : PLEURA + 20, 60:75] = C.EFFUSION
    m[0, PLEURA + 21 : PLEURA + 30, 62:72] = C.CONSOLIDATION  # lung floating in the effusion: kept
    out = refine(np.full(m.shape, 80, np.uint8), m, RefineConfig(b_line_max_structure=0))[0]
    assert (out[PLEURA + 2 : PLEURA + 12, 5:15] == C.CONSOLIDATION).all()
    assert not (out[60:70, 40:50] == C.CONSOLIDATION).any()
    assert (out[PLEURA + 21 : PLEURA + 30, 62:72] == C.CONSOLIDATION).all()


def test_b_line_over_visible_a_lines_is_haze() -> None:
    """A-lines in columns 0-40 and none in 40-80: only the right half can hold a B-line."""
    img = _lung_image(slice(0, 40))
    depth = pleura_depth(_labels()[0])
    assert depth is not None
    structure, ok = horizontal_structure(img[0], depth)
    assert ok[5:75].all()
    assert structure[5:30].min() > 2 * structure[50:75].max()
    m = _labels()
    m[0, PLEURA + 2 :, 10:30] = C.B_LINE
    m[0, PLEURA + 2 :, 50:70] = C.B_LINE
    out = refine(img, m)[0]
    assert not (out[:, 10:30] == C.B_LINE).any()
    assert (out[PLEURA + 2 :, 50:70] == C.B_LINE).all()


def test_no_pleura_no_change() -> None:
    m = np.zeros((2, ROWS, COLS), np.uint8)
    m[:, 30:50, 10:20] = C.CONSOLIDATION
    assert np.array_equal(refine(np.full(m.shape, 80, np.uint8), m), m)


def test_phantom_truth_survives_refinement() -> None:
    """On phantom truth most B-line and consolidation pixels survive (the texture test sits at the
    equal-error point of B-line and A-line scan lines, so some faint true B-lines go)."""
    from workers.training.phantom import make_sample

    rng = np.random.default_rng(3)
    kept = []
    for _ in range(40):
        s = make_sample(rng)
        before = np.isin(s.labels, [C.B_LINE, C.CONSOLIDATION]).sum()
        if before < 50:
            continue
        after = np.isin(refine(s.image[None], s.labels[None])[0], [C.B_LINE, C.CONSOLIDATION]).sum()
        kept.append(after / before)
    assert kept and float(np.mean(kept)) > 0.6
