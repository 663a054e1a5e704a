"""Network shape and gates, a one-step training smoke run, and agreement metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.agreement import agreement, quadratic_kappa
from service.core.model_package import class_names
from workers.infer.unet import N_CLASSES, AttentionGate, AttentionUNet
from workers.training.train import TrainConfig, dice_per_class, train


def test_unet_output_shape() -> None:
    m = AttentionUNet(8).eval()
    with torch.no_grad():
        y = m(torch.rand(2, 1, 64, 96))
    assert y.shape == (2, N_CLASSES, 64, 96)


def test_attention_gate_scales_skip_features_into_range() -> None:
    g = AttentionGate(4, 4, 2)
    x = torch.rand(1, 4, 8, 8) + 1.0
    out = g(x, torch.rand(1, 4, 8, 8))
    assert torch.all(out <= x) and torch.all(out >= 0)


def test_one_step_training_writes_artifacts(tmp_path: Path) -> None:
    cfg = TrainConfig(seed=1, epochs=1, samples=4, val_samples=2, batch=4, base=4, rows=64, cols=64)
    metrics = train(cfg, tmp_path)
    for name in ("lus_unet.pt", "lus_unet.onnx", "metrics.json"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["weights_sha256"] == metrics["weights_sha256"]
    assert torch.load(tmp_path / "lus_unet.pt", weights_only=True)["classes"] == class_names()
    assert set(saved["history"][0]["val_dice"]) == {"background", "pleural_line", "a_line", "b_line",
                                                    "consolidation", "effusion", "rib_shadow"}  # fmt: skip


def test_dice_per_class() -> None:
    t = np.array([[0, 1], [1, 2]])
    p = np.array([[0, 1], [2, 2]])
    d = dice_per_class(p, t)
    assert d["pleural_line"] == pytest.approx(2 / 3) and d["b_line"] == 1.0  # absent in both


def test_kappa_and_agreement() -> None:
    a = np.array([0, 1, 2, 3, 0, 1, 2, 3])
    assert quadratic_kappa(a, a) == pytest.approx(1.0)
    assert quadratic_kappa(a, 3 - a) < 0
    r = agreement(a, np.array([0, 1, 2, 2, 0, 2, 2, 0]))
    assert (r.exact, r.within_one) == (0.625, 0.875)
    assert r.confusion[3] == [1, 0, 1, 0]
