"""The shipped weights load, ORT and torch agree, and the device is chosen safely."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from service.core.model_package import DEFAULT_PACKAGE, file_sha256, load_package
from workers.infer.predict import Predictor, resolve_device
from workers.training.phantom import make_sample

DEFAULT_WEIGHTS = DEFAULT_PACKAGE / "lus_unet.pt"


def test_shipped_weights_are_small_and_listed() -> None:
    pkg = load_package(DEFAULT_PACKAGE)
    assert pkg.files["segmenter_torch"] == DEFAULT_WEIGHTS
    assert DEFAULT_WEIGHTS.stat().st_size < 10e6
    assert pkg.files["segmenter_onnx"].stat().st_size < 10e6


def test_onnxruntime_matches_torch() -> None:
    rng = np.random.default_rng(0)
    frames = np.stack([make_sample(rng).image for _ in range(3)])
    ort = Predictor(device="cpu")
    ref = Predictor(device="cpu", backend="torch")
    assert ort.backend == "onnxruntime" and ref.backend == "torch"
    la, pa = ort.predict(frames, probabilities=True)
    lb, pb = ref.predict(frames, probabilities=True)
    assert pa is not None and pb is not None
    assert (la == lb).mean() > 0.999
    assert np.abs(pa.astype(np.float32) - pb.astype(np.float32)).max() < 1e-2
    assert np.allclose(pa.astype(np.float32).sum(1), 1.0, atol=1e-2)
    assert ort.weights_sha256 == file_sha256(DEFAULT_WEIGHTS)
    assert ort.package.package_sha256 == ref.package.package_sha256


def test_wrong_frame_shape_rejected() -> None:
    with pytest.raises(ValueError):
        Predictor(device="cpu").predict(np.zeros((1, 10, 10), np.uint8))


def test_device_resolution() -> None:
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") in {"cpu", "cuda"}
    with pytest.raises(ValueError):
        resolve_device("tpu")


def test_serving_imports_nothing_from_training() -> None:
    """The worker's pipeline loads without the phantom, training code or rich (a training-only dep)."""
    code = (
        "import sys, workers.pipeline; "
        "print(sorted(m for m in sys.modules if m.startswith(('workers.training', 'rich'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
