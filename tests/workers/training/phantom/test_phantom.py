"""Phantom: reproducible, labels consistent with the drawn scenario, cine with lung sliding."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from service.core.segments import SegmentClass as C
from workers.preprocess import Grid, GridShape
from workers.training.phantom import SCENARIOS, make_cine, make_sample, random_scene, render


def test_same_seed_same_sample() -> None:
    a = make_sample(np.random.default_rng(42))
    b = make_sample(np.random.default_rng(42))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels) and a.score == b.score


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scene_labels_match_scenario(scenario: str) -> None:
    rng = np.random.default_rng(7)
    hits = []
    for _ in range(10):
        scene = random_scene(rng, 128, 128, scenario)
        amp, lab, _ = render(scene, rng)
        assert amp.shape == lab.shape == (128, 128)
        present = set(np.unique(lab).tolist())
        assert C.PLEURAL_LINE in present
        if scenario == "normal":
            assert C.B_LINE not in present and C.CONSOLIDATION not in present
        want = {"b_lines": C.B_LINE, "confluent": C.B_LINE, "white_lung": C.B_LINE}.get(
            scenario, C.CONSOLIDATION
        )
        hits.append(want in present if scenario != "normal" else C.A_LINE in present)
    # Thin consolidations under a thick pleura, or faint A-lines, are legitimately not drawn.
    assert np.mean(hits) >= 0.7


def test_label_and_image_agree_on_structure() -> None:
    """B-line pixels are brighter than the lung beside them, effusion darker than the wall above."""
    rng = np.random.default_rng(11)
    bright, dark = [], []
    for _ in range(30):
        s = make_sample(rng)
        img, lab = s.image.astype(float), s.labels
        lung = (lab == C.BACKGROUND) & (np.arange(128)[:, None] > 60) & (img > 0)
        if (lab == C.B_LINE).sum() > 100 and lung.sum() > 100:
            bright.append(img[lab == C.B_LINE].mean() > img[lung].mean())
        if (lab == C.EFFUSION).sum() > 50:
            dark.append(img[lab == C.EFFUSION].mean() < img[lab == C.PLEURAL_LINE].mean())
    assert bright and np.mean(bright) > 0.8
    assert all(dark)


def test_scores_cover_all_levels() -> None:
    rng = np.random.default_rng(1)
    scores = {make_sample(rng, GridShape()).score for _ in range(60)}
    assert scores == {0, 1, 2, 3}


def test_cine_slides_and_keeps_geometry() -> None:
    c = make_cine(np.random.default_rng(2), n_frames=6, src=(200, 240), scenario="b_lines")
    assert c.frames.shape == c.labels.shape == (6, 200, 240)
    assert c.frames.dtype == np.uint8
    assert not np.array_equal(c.frames[0], c.frames[3])
    assert set(np.unique(c.labels).tolist()) <= {int(k) for k in C}
    # Outside the sector the image is black, as on a scanner.
    grid = Grid(c.sector, (200, 240))
    inside = grid.to_source(np.ones((1, *grid.shape.__dict__.values()), np.uint8))[0] == 1
    outside = ~binary_dilation(inside, iterations=2)  # the edge is interpolated
    assert outside.sum() > 1000
    assert (c.frames[:, outside] == 0).mean() > 0.99
