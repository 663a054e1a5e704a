"""Threshold calibration moves a cut-off only when that improves agreement with the experts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from service.core.segments import SegmentClass as C
from workers.score.lus import GridSpacing, ScoreConfig
from workers.training.calibrate import Cached, measure, rescore, search, video_scores
from workers.training.evaluate import LabelledItem


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
    from workers.training.calibrate import CV_SPLITS, cross_validate, measure_all

    report: dict[str, object] = {}
    cv = cross_validate(measure_all(_data()), report)
    assert len(cv["splits"]) == CV_SPLITS  # type: ignore[arg-type]
    assert all(s["n"] == 8 for s in cv["splits"])  # type: ignore[attr-defined]
    assert f"split{CV_SPLITS - 1}_fold1_config" in report
    assert 0.0 <= cv["mean_exact"] <= 1.0  # type: ignore[operator]


def test_search_with_slack_takes_the_most_conservative_of_equal_cut_offs() -> None:
    from workers.training.calibrate import SEARCH, measure_all, search_all

    data = _data()
    default = ScoreConfig(confluent_min_mm=30.0)
    measured = measure(data, default)
    first = search(measured, default)  # without slack: the defaults' side of every tie
    assert (first.score1_fraction, first.consolidation_min_mm2, first.persist_s) == (0.1, 10.0, 0.0)
    safe = search(measured, default, slack=0.005)
    assert list(video_scores(data, safe)) == [0] * 4 + [1] * 4  # agreement is not traded away
    assert safe.score1_fraction == 0.1  # the one cut-off the data decides
    # Nothing here tells the others apart: each goes to its highest (least often abnormal) value.
    for name in ("score3_fraction", "consolidation_min_mm2", "consolidation_large_mm", "irregular_mm"):
        assert getattr(safe, name) == max(SEARCH[name]), name
    # Across measurement settings too: no confluent run or pleural break matters to these experts.
    m, cfg = search_all(measure_all(data), list(range(8)), slack=0.005)
    assert (cfg.confluent_min_mm, cfg.break_min_mm, cfg.score1_fraction) == (20.0, 5.0, 0.1)
    assert m == 3


def test_phantom_source_segments_cine_and_labels_them_with_their_true_score(tmp_path: Path) -> None:
    from workers.training.calibrate import PHANTOM_FRAMES, phantom_segmentations
    from workers.training.phantom import SCENARIOS

    data = phantom_segmentations(3, 2027, tmp_path)
    scenarios = [list(SCENARIOS)[int(np.load(d.item.path)["scenario"])] for d in data]
    # Seed 2027 draws two normal lungs and a lobar consolidation: scores 0, 0 and 3.
    assert scenarios == ["normal", "normal", "lobar"]
    assert [d.item.score for d in data] == [0, 0, 3]
    assert len({d.item.patient for d in data}) == 3  # every cine is its own "patient"
    for d in data:
        assert PHANTOM_FRAMES[0] <= d.labels.shape[0] <= PHANTOM_FRAMES[1]
        assert d.labels.shape[1:] == (128, 128) and d.frame_rate == 25.0
        assert set(np.unique(d.labels)) <= set(range(len(C)))
    # The network sees the lobar consolidation the phantom drew (it was not told the truth).
    assert (data[2].labels == C.CONSOLIDATION).mean() > 0.02
    # A larger set from the same seed reuses the cached cine and extends them.
    stamps = {f.name: f.stat().st_mtime_ns for f in tmp_path.iterdir()}
    more = phantom_segmentations(4, 2027, tmp_path)
    assert len(more) == 4 and all(tmp_path.joinpath(n).stat().st_mtime_ns == t for n, t in stamps.items())
    assert all(np.array_equal(a.labels, b.labels) for a, b in zip(data, more[:3], strict=False))


def test_phantom_calibration_command_writes_an_operating_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    import sys

    from workers.score.lus import load_score_config
    from workers.training.calibrate import main

    out, cfg = tmp_path / "report.json", tmp_path / "score_config.json"
    argv = ["calibrate", "--phantom", "3", "--seed", "2027", "--check-seed", "7",
            "--cache", str(tmp_path / "c"), "--out", str(out), "--write-config", str(cfg)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    main()
    report = json.loads(out.read_text())
    assert report["source"] == {"phantom": 3, "seed": 2027} and report["truth_counts"] == [2, 0, 0, 1]
    assert report["check"]["seed"] == 7 and report["check"]["calibrated"]["n"] == 3
    assert "calibrated_patient_cv" not in report  # a second phantom set stands in for it
    chosen = load_score_config(cfg)
    assert json.loads(cfg.read_text()) == report["calibrated_config"]
    assert chosen.consolidation_min_mm2 == report["calibrated_config"]["consolidation_min_mm2"]
    # Neither a folder nor --phantom, or both: a usage error, not a traceback.
    for bad in (["calibrate", "--cache", "x"], ["calibrate", "f", "--phantom", "2", "--cache", "x"]):
        monkeypatch.setattr(sys, "argv", bad)
        with pytest.raises(SystemExit) as exc:
            main()
        assert exc.value.code == 2
    assert "either a labelled FOLDER or --phantom N" in capsys.readouterr().err
