"""Adaptation pieces on small data: labels CSV, weak labels, folds, the ordinal head and its exports."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.model_package import DEFAULT_PACKAGE
from workers.infer.scorer import (
    LearnedScorer,
    ScoreNet,
    ScorerSpec,
    export_scorer_onnx,
    head_input,
    pool,
    save_scorer,
    scores_from_severity,
    summarize,
)
from workers.infer.unet import load_model
from workers.training.adapt.cv import patient_folds
from workers.training.adapt.data import read_labels, weak_findings
from workers.training.adapt.train import _class_weights, _Cuts, augment, ordinal_loss


def test_labels_csv_rows_rejected_and_weak_findings(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text(
        "sop_instance_uid,score,patient_id,a_lines,b_lines,comments\n"
        '1.2.3,2,P1,yes ,yes,"broken pleura line, small consolidated areas, B-lines"\n'
        "1.2.4,x,P1,,,\n"
        "1.2.5,7,P2,,,\n"
        "1.2.3,1,P1,,,\n"
        "1.2.6,0,,no,no,A-lines\n"
    )
    ls = read_labels(csv)
    assert [r.sop_instance_uid for r in ls.rows] == ["1.2.3", "1.2.6"]
    assert len(ls.rejected) == 3 and "line 3" in ls.rejected[0] and "twice" in ls.rejected[2]
    first = ls.rows[0].findings
    assert first["pleura_abnormal"] == 1.0 and first["consolidation"] == 1.0 and first["b_lines"] == 1.0
    assert first["a_lines"] == 1.0 and first["confluent"] == 0.0
    # No patient column value: the cine is its own group, never pooled with another patient.
    assert ls.rows[1].patient_id == "instance:1.2.6"
    assert ls.rows[1].findings["b_lines"] == 0.0


def test_labels_csv_needs_uid_and_score(tmp_path: Path) -> None:
    csv = tmp_path / "labels.csv"
    csv.write_text("file,severity\na.dcm,1\n")
    with pytest.raises(ValueError, match="sop_instance_uid and score"):
        read_labels(csv)


def test_weak_findings_unknown_without_comment() -> None:
    f = weak_findings("", None, None)
    assert all(math.isnan(v) for v in f.values())
    assert weak_findings("white lung areas", "no", "yes")["confluent"] == 1.0


def test_patient_folds_never_split_a_patient() -> None:
    groups = np.array([f"P{i // 3}" for i in range(30)])
    folds = patient_folds(groups, 4, seed=1)
    assert sum(f.sum() for f in folds) == 30
    assert not np.logical_and.reduce([f for f in folds]).any()
    for f in folds:
        assert set(groups[f]).isdisjoint(groups[~f])
    assert [f.tolist() for f in folds] == [f.tolist() for f in patient_folds(groups, 4, seed=1)]


def test_ordinal_decision_and_loss() -> None:
    cuts = np.array([-1.0, 0.0, 1.0])
    assert scores_from_severity(np.array([-2.0, -0.5, 0.5, 3.0]), cuts).tolist() == [0, 1, 2, 3]
    c = _Cuts()()
    assert torch.all(torch.diff(c) > 0)
    y = torch.tensor([0, 3])
    good = ordinal_loss(torch.tensor([-5.0, 5.0]), c.detach(), y)
    bad = ordinal_loss(torch.tensor([5.0, -5.0]), c.detach(), y)
    assert float(good) < 0.1 < float(bad)


def test_pool_is_a_soft_maximum_independent_of_frame_count() -> None:
    one = torch.tensor([[0.0, 0.0, 2.0, 0.0]])
    assert 0.0 < float(pool(one, 4.0)) < 2.0
    assert float(pool(torch.tensor([[1.0] * 3]), 4.0)) == pytest.approx(1.0)
    assert float(pool(torch.tensor([[1.0] * 300]), 4.0)) == pytest.approx(1.0)
    assert float(pool(one, 50.0)) > float(pool(one, 1.0))


def test_augment_keeps_shapes_and_masks_outside() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 4, 32, 40)
    m = torch.ones(3, 1, 32, 40)
    m[:, :, :, :5] = 0
    xa, ma = augment(x * m, m, gen)
    assert xa.shape == x.shape and ma.shape == m.shape
    assert float(xa.min()) >= 0.0 and float(xa.max()) <= 1.0
    assert float((xa * (1 - ma)).abs().sum()) == 0.0


def test_scorer_torch_and_onnx_agree(tmp_path: Path) -> None:
    seg, _ = load_model(DEFAULT_PACKAGE / "lus_unet.pt")
    spec = ScorerSpec(rows=64, cols=128)
    net = ScoreNet(spec)
    net.init_from_segmenter(seg)
    save_scorer(net.eval(), spec, tmp_path / "scorer.pt")
    export_scorer_onnx(tmp_path / "scorer.pt", tmp_path / "scorer.onnx")
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (5, 128, 128), dtype=np.uint8)
    valid = np.ones((128, 128), bool)
    valid[100:, :20] = False
    a = LearnedScorer(tmp_path / "scorer.pt", None).score(frames, valid)
    b = LearnedScorer(tmp_path / "scorer.pt", tmp_path / "scorer.onnx").score(frames, valid)
    assert b.score == a.score
    np.testing.assert_allclose(a.frame_severity, b.frame_severity, atol=1e-4)
    assert sum(a.probabilities) == pytest.approx(1.0, abs=1e-3)
    assert set(a.findings) == set(spec.aux)


def test_summarize_frame_and_video_scores() -> None:
    spec = ScorerSpec(cutpoints=(-1.0, 0.0, 1.0), pool_tau=20.0)
    sev = np.array([-3.0, -3.0, 2.5, -3.0], np.float32)
    out = summarize(sev, np.zeros((4, len(spec.aux)), np.float32), spec)
    assert out.frame_scores.tolist() == [0, 0, 3, 0]
    assert out.score == 3  # one severe frame in four decides, as the 1% rule wants
    assert max(out.probabilities) == out.probabilities[3]


def test_normalised_input_ignores_gain() -> None:
    rng = np.random.default_rng(1)
    pattern = rng.integers(0, 200, (6, 128, 128)).astype(np.float32)
    valid = np.ones((128, 128), bool)
    spec = ScorerSpec(normalize=True)
    dim, _ = head_input((pattern * 0.5).astype(np.uint8), valid, spec)
    bright, _ = head_input((pattern * 1.2).astype(np.uint8), valid, spec)
    np.testing.assert_allclose(dim, bright, atol=0.02)
    plain, _ = head_input((pattern * 0.5).astype(np.uint8), valid, ScorerSpec())
    assert abs(float(plain.mean()) - float(dim.mean())) > 0.05  # off by default: raw levels


def test_class_weights_favour_rare_scores() -> None:
    y = torch.tensor([0] * 6 + [1] * 3 + [3])
    w = _class_weights(y)
    assert float(w[y].mean()) == pytest.approx(1.0)
    assert float(w[3]) > float(w[1]) > float(w[0])
    plain = ordinal_loss(torch.zeros(2), torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0, 3]))
    same = ordinal_loss(torch.zeros(2), torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0, 3]), torch.ones(2))
    assert float(plain) == pytest.approx(float(same))
