"""The weights file records its classes, and serving refuses weights that disagree with the package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from service.core.model_package import DEFAULT_PACKAGE, PackageError, class_names, write_package
from service.core.segments import SegmentClass
from workers.infer.predict import Predictor
from workers.infer.unet import AttentionUNet, load_model, save_weights
from workers.preprocess.grid import GridShape
from workers.training.train import export_onnx

SHAPE = GridShape(64, 64)


def _weights(path: Path, n_classes: int = len(SegmentClass), names: list[str] | None = None) -> Path:
    torch.manual_seed(0)
    names = names if names is not None else [f"class{k}" for k in range(n_classes)]
    save_weights(AttentionUNet(4, n_classes), path, SHAPE, names)
    return path


def test_weights_record_their_classes_and_grid(tmp_path: Path) -> None:
    f = _weights(tmp_path / "w.pt", names=class_names())
    assert torch.load(f, weights_only=True)["classes"] == class_names()
    model, shape = load_model(f, classes=class_names())
    assert model.n_classes == len(SegmentClass) and shape == SHAPE and not model.training
    with pytest.raises(ValueError, match="1 class names for a network with 7 outputs"):
        save_weights(model, tmp_path / "x.pt", SHAPE, ["background"])


def test_load_model_takes_the_count_from_the_weights_and_checks_it(tmp_path: Path) -> None:
    five = _weights(tmp_path / "five.pt", n_classes=5)
    assert load_model(five)[0].n_classes == 5  # no expectation: whatever the output layer has
    with pytest.raises(ValueError, match=r"five\.pt has 5 output classes, expected 7"):
        load_model(five, classes=class_names())
    renamed = _weights(tmp_path / "renamed.pt", names=[*class_names()[:-1], "pneumothorax"])
    with pytest.raises(ValueError, match="trained on classes"):
        load_model(renamed, classes=class_names())
    # Weights saved before names were recorded carry only the count, which is still checked.
    model, _ = load_model(DEFAULT_PACKAGE / "lus_unet.pt", classes=class_names())
    assert model.n_classes == len(SegmentClass)


def test_predictor_refuses_weights_with_other_classes(tmp_path: Path) -> None:
    five = _weights(tmp_path / "five.pt", n_classes=5)
    pkg = write_package(tmp_path / "pkg", name="five", version="1", files={"segmenter_torch": five})
    with pytest.raises(PackageError, match=r"model package .*pkg: lus_unet\.pt has 5 output classes"):
        Predictor(pkg, device="cpu")


def test_predictor_refuses_an_onnx_export_of_other_weights(tmp_path: Path) -> None:
    seven = _weights(tmp_path / "seven.pt", names=class_names())
    onnx = tmp_path / "five.onnx"
    export_onnx(_weights(tmp_path / "five.pt", n_classes=5), onnx)
    files = {"segmenter_torch": seven, "segmenter_onnx": onnx}
    pkg = write_package(tmp_path / "pkg", name="mixed", version="1", files=files)
    labels, _ = Predictor(pkg, device="cpu", backend="torch").predict(np.zeros((1, 64, 64), np.uint8))
    assert labels.shape == (1, 64, 64)
    with pytest.raises(PackageError, match="segmenter_onnx has 5 output classes, the package 7"):
        Predictor(pkg, device="cpu", backend="onnx")


def test_probabilities_have_one_plane_per_class(tmp_path: Path) -> None:
    files = {"segmenter_torch": _weights(tmp_path / "w.pt", names=class_names())}
    pkg = write_package(tmp_path / "pkg", name="tiny", version="1", files=files)
    predictor = Predictor(pkg, device="cpu")
    _, probs = predictor.predict(np.zeros((2, 64, 64), np.uint8), probabilities=True)
    assert predictor.classes == tuple(class_names())
    assert probs is not None and probs.shape == (2, len(class_names()), 64, 64)
