"""Threshold calibration moves a cut-off only when that improves agreement with the experts."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from workers.domain import SegmentClass as C
from workers.infer.calibrate import Cached, measure, rescore, search, video_scores
from workers.infer.evaluate import LabelledItem
from workers.score.lus import GridSpacing, ScoreConfig


def _video(b_width: int) -> np.ndarray:
    m = np.zeros((3, 64, 100), np.uint8)
    m[:, 10, :] = C.PLEURAL_LINE
    m[:, 11:, 20 : 20 + b_width] = C.B_LINE
    return m


def _data() -> list[Cached]:
    sp = GridSpacing.uniform(64, 1.0, 1.0)
    # Experts: 8-line-wide artefacts are normal (score 0); 15-wide are B-lines (score 1).
    data = [Cached(LabelledItem(Path(f"{i}.dcm"), 0, str(i)), _video(8), sp) for i in range(4)]
    return data + [Cached(LabelledItem(Path(f"{i}.dcm"), 1, str(i)), _video(15), sp) for i in range(4, 8)]


def test_rescore_matches_the_pipeline() -> None:
    data = _data()
    cfg = ScoreConfig(confluent_min_mm=30.0, score1_fraction=0.1)
    assert list(rescore(measure(data, cfg), cfg)) == list(video_scores(data, cfg)) == [0] * 4 + [1] * 4


def test_search_raises_score1_cutoff_when_experts_call_narrow_b_lines_normal() -> None:
    data = _data()
    default = ScoreConfig(confluent_min_mm=30.0)
    assert list(video_scores(data, default)) == [1] * 8
    tuned = search(measure(data, default), default)
    assert list(video_scores(data, tuned)) == [0] * 4 + [1] * 4
    assert tuned.score1_fraction == 0.1


def test_cross_validation_is_patient_wise_and_reports_each_split() -> None:
    from workers.infer.calibrate import CV_SPLITS, cross_validate, measure_all

    report: dict[str, object] = {}
    cv = cross_validate(measure_all(_data()), report)
    assert len(cv["splits"]) == CV_SPLITS  # type: ignore[arg-type]
    assert all(s["n"] == 8 for s in cv["splits"])  # type: ignore[attr-defined]
    assert f"split{CV_SPLITS - 1}_fold1_config" in report
    assert 0.0 <= cv["mean_exact"] <= 1.0  # type: ignore[operator]
