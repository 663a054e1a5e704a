"""The scoring rule on constructed class maps: every score level, measurements and the 1% rule."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.core.segments import SegmentClass as C
from workers.score.lus import (
    GridSpacing,
    ScoreConfig,
    aggregate,
    frame_findings,
    load_score_config,
    video_findings,
)

ROWS, COLS, PLEURA = 64, 100, 10
SP = GridSpacing.uniform(ROWS, 1.0, 1.0)  # 1 mm cells


def lung(a_lines: bool = True) -> np.ndarray:
    m = np.zeros((ROWS, COLS), np.uint8)
    m[PLEURA, :] = C.PLEURAL_LINE
    if a_lines:
        m[2 * PLEURA, :] = C.A_LINE
        m[3 * PLEURA, :] = C.A_LINE
    return m


def b_line(m: np.ndarray, start: int, width: int) -> np.ndarray:
    m[PLEURA + 1 :, start : start + width] = C.B_LINE
    return m


def test_normal_lung_scores_0() -> None:
    f = frame_findings(lung(), SP)
    assert (f.score, f.b_line_count, f.pleura_scanlines, f.a_lines) == (0, 0, COLS, True)
    assert f.pleura_breaks == 0 and f.pleura_irregularity < 0.1


def test_separate_b_lines_score_1_and_are_counted() -> None:
    m = lung()
    for s in (10, 40, 70):
        b_line(m, s, 3)
    f = frame_findings(m, SP)
    assert (f.score, f.b_line_count, f.b_line_scanlines) == (1, 3, 9)
    assert f.b_line_fraction == pytest.approx(0.09)
    assert not f.confluent


def test_b_lines_one_column_apart_are_one_line() -> None:
    m = b_line(b_line(lung(), 20, 3), 24, 3)  # gap of one 1-mm column < merge distance 1.5 mm
    assert frame_findings(m, SP).b_line_count == 1


def test_short_b_line_artefact_is_not_a_b_line() -> None:
    m = lung()
    m[PLEURA + 1 : PLEURA + 6, 30:33] = C.B_LINE  # comet tail: 5 of 53 rows
    assert frame_findings(m, SP).score == 0


def test_confluent_with_intact_pleura_is_1_with_broken_pleura_is_2() -> None:
    m = b_line(lung(), 20, 30)
    f = frame_findings(m, SP)
    assert f.confluent and f.score == 1
    m[PLEURA, 60:66] = C.BACKGROUND  # 6 mm gap
    f = frame_findings(m, SP)
    assert (f.score, f.pleura_breaks) == (2, 1)


def test_irregular_pleura_with_confluent_b_lines_is_2() -> None:
    m = np.zeros((ROWS, COLS), np.uint8)
    for c in range(COLS):
        m[PLEURA + (3 if (c // 2) % 2 else 0), c] = C.PLEURAL_LINE
    b_line(m, 20, 30)
    f = frame_findings(m, SP)
    assert f.pleura_irregularity > ScoreConfig().irregular_mm
    assert f.score == 2


def test_small_consolidation_is_2_large_is_3() -> None:
    m = lung()
    m[PLEURA + 1 : PLEURA + 6, 40:48] = C.CONSOLIDATION  # 8 x 5 mm
    f = frame_findings(m, SP)
    assert (f.score, f.consolidation_area_mm2, f.consolidation_depth_mm) == (2, 40.0, 5.0)
    m[PLEURA + 1 : PLEURA + 21, 40:60] = C.CONSOLIDATION  # 20 mm deep
    assert frame_findings(m, SP).score == 3


def test_tiny_consolidation_is_noise() -> None:
    m = lung()
    m[PLEURA + 1 : PLEURA + 3, 40:43] = C.CONSOLIDATION  # 6 mm^2
    f = frame_findings(m, SP)
    assert f.score == 0 and f.consolidation_area_mm2 == 0


def test_white_lung_is_3() -> None:
    f = frame_findings(b_line(lung(False), 10, 60), SP)
    assert f.confluent and f.b_line_fraction == pytest.approx(0.6) and f.score == 3


def test_rib_shadow_columns_are_not_pleura() -> None:
    m = lung()
    m[5:, 80:] = C.RIB_SHADOW
    f = frame_findings(m, SP)
    assert f.pleura_scanlines == 80 and f.pleura_breaks == 0


def test_effusion_area_uses_spacing() -> None:
    m = lung()
    m[PLEURA + 1 : PLEURA + 11, 0:20] = C.EFFUSION
    sp = GridSpacing.uniform(ROWS, 0.5, 2.0)
    assert frame_findings(m, sp).effusion_area_mm2 == pytest.approx(200 * 1.0)


def test_no_pleura_no_score_but_lobar_consolidation_scores() -> None:
    empty = np.zeros((ROWS, COLS), np.uint8)
    assert frame_findings(empty, SP).score == 0
    empty[5:40, 10:80] = C.CONSOLIDATION
    assert frame_findings(empty, SP).score == 3


def _video(n: int, high: dict[int, np.ndarray]) -> np.ndarray:
    v = np.repeat(lung()[None], n, axis=0)
    for i, m in high.items():
        v[i] = m
    return v


def test_one_percent_rule_and_key_frame() -> None:
    white = b_line(lung(False), 10, 60)
    one = b_line(lung(), 30, 3)
    # 200 frames: one white-lung frame is < 1% (2 frames), so the video takes the next score.
    v = video_findings(_video(200, {7: white, 50: one, 51: one}), SP)
    assert v.score == 1 and v.key_frame in (50, 51)
    v = video_findings(_video(200, {7: white, 8: white, 50: one}), SP)
    assert v.score == 3 and v.key_frame in (7, 8)
    assert v.frame_scores[7] == 3 and len(v.frame_scores) == 200
    assert v.b_line_fraction == pytest.approx(0.6)
    # 50 frames: one frame is 2%, enough.
    assert video_findings(_video(50, {3: white}), SP).score == 3


def test_persistence_option() -> None:
    white = b_line(lung(False), 10, 60)
    frames = video_findings(_video(20, {3: white, 9: white, 10: white}), SP).frames
    # 10 frames/s: 0.3 s is 3 frames (frames 9-10 are only 2), 0.2 s is 2 frames.
    assert aggregate(frames, ScoreConfig(persist_s=0.3), frame_rate=10.0).score == 0
    assert aggregate(frames, ScoreConfig(persist_s=0.2), frame_rate=10.0).score == 3
    # The same 0.2 s at 25 frames/s is 5 frames: a 2-frame run no longer counts.
    assert aggregate(frames, ScoreConfig(persist_s=0.2), frame_rate=25.0).score == 0
    # Without a stated rate the default (25/s) applies.
    assert aggregate(frames, ScoreConfig(persist_s=0.2)).score == 0


def test_video_flags_and_bla() -> None:
    m = b_line(lung(), 0, 10)
    m[PLEURA + 1 : PLEURA + 11, 40:60] = C.EFFUSION
    v = video_findings(_video(10, dict.fromkeys(range(10), m)), SP)
    assert v.effusion and not v.consolidation
    assert v.bla_score == pytest.approx(10.0)
    assert v.to_dict()["frame_scores"] == list(v.frame_scores)


def test_operating_point_file(tmp_path: Path) -> None:
    f = tmp_path / "score_config.json"
    f.write_text(json.dumps({"score1_fraction": 0.4, "b_line_merge_mm": 2}))
    cfg = load_score_config(f)
    assert cfg.score1_fraction == 0.4 and cfg.b_line_merge_mm == 2.0
    assert isinstance(cfg.b_line_merge_mm, float)
    assert cfg.score3_fraction == ScoreConfig().score3_fraction  # missing keys keep the clinical default
    f.write_text(json.dumps({"score1_fraktion": 0.4}))
    with pytest.raises(ValueError, match="score1_fraktion"):
        load_score_config(f)
