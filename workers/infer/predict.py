"""Grid frames ``(n, rows, cols)`` uint8 -> class maps and per-class probabilities, batched.

On CPU the ONNX export runs under onnxruntime (about 30% faster than eager torch here); torch is
the reference path and the one used on CUDA. Both give the same class maps up to float rounding.
The class count comes from the loaded weights and must agree with the package's classes (which
the package loader has already checked against SegmentClass), so a label value always means what
scoring and the DICOM writers take it to mean.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.core.model_package import DEFAULT_PACKAGE, ModelPackage, PackageError, load_package
from workers.infer.unet import load_model
from workers.preprocess.grid import GridShape

log = logging.getLogger(__name__)


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in {"cpu", "cuda"}:
        raise ValueError(f"unknown device {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA requested but not available")
    return device


class Predictor:
    """Loads the network once; :meth:`predict` is safe to call for every cine of a worker.

    ``package`` is a model package (folder, file in it, or loaded; None: the shipped one); its hashes
    are verified before the weights are read, and weights whose outputs are not the package's
    classes are refused (:class:`~service.core.model_package.PackageError` in both cases).
    """

    def __init__(
        self,
        package: ModelPackage | Path | str | None = None,
        device: str = "auto",
        backend: str = "auto",
        batch: int = 16,
    ):
        pkg = package if isinstance(package, ModelPackage) else load_package(package or DEFAULT_PACKAGE)
        self.device = resolve_device(device)
        self.package = pkg
        self.weights_path = pkg.files["segmenter_torch"]
        self.weights_sha256 = pkg.sha256s["segmenter_torch"]
        self.batch = batch
        self.classes = pkg.classes
        try:
            self.model, self.shape = load_model(self.weights_path, self.device, classes=pkg.classes)
        except ValueError as exc:
            raise PackageError(f"model package {pkg.path}: {exc}") from None
        onnx = pkg.file("segmenter_onnx")
        if backend == "onnx" and onnx is None:
            raise ValueError(f"model package {pkg.path} has no segmenter_onnx file")
        use_ort = onnx is not None and (backend == "onnx" or (backend == "auto" and self.device == "cpu"))
        self._ort = ort_session(onnx) if use_ort and onnx is not None else None
        if self._ort is not None:
            _check_onnx_classes(self._ort, len(self.classes), pkg.path)
        self.backend = "onnxruntime" if self._ort is not None else "torch"
        log.info(
            "model %s %s loaded (%s, %s, package %s)",
            pkg.name, pkg.version, self.backend, self.device, pkg.package_sha256[:12],
        )  # fmt: skip

    @property
    def grid_shape(self) -> GridShape:
        return self.shape

    def predict(
        self, frames: np.ndarray, probabilities: bool = False
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(labels uint8 (n, rows, cols), probabilities float16 (n, classes, rows, cols) or None)."""
        if frames.ndim != 3 or frames.shape[1:] != (self.shape.rows, self.shape.cols):
            raise ValueError(f"expected (n, {self.shape.rows}, {self.shape.cols}) frames, got {frames.shape}")
        labels = np.empty(frames.shape, np.uint8)
        probs = (
            np.empty((frames.shape[0], len(self.classes), *frames.shape[1:]), np.float16)
            if probabilities
            else None
        )
        for k in range(0, frames.shape[0], self.batch):
            x = frames[k : k + self.batch, None].astype(np.float32) * (1.0 / 255.0)
            logits = self._logits(x)
            labels[k : k + len(x)] = logits.argmax(1)
            if probs is not None:
                e = np.exp(logits - logits.max(1, keepdims=True))
                probs[k : k + len(x)] = e / e.sum(1, keepdims=True)
        return labels, probs

    def _logits(self, x: np.ndarray) -> np.ndarray:
        if self._ort is not None:
            return np.asarray(self._ort.run(None, {"image": x})[0])
        with torch.inference_mode():
            t = torch.from_numpy(x).to(self.device)
            return self.model(t).float().cpu().numpy()


def _check_onnx_classes(session: Any, n_classes: int, package: Path) -> None:
    """The ONNX export must have as many outputs per pixel as the torch weights it was made from."""
    dim = session.get_outputs()[0].shape[1]
    if isinstance(dim, int) and dim != n_classes:
        raise PackageError(
            f"model package {package}: segmenter_onnx has {dim} output classes, the package {n_classes}"
        )


def ort_session(path: Path) -> Any:
    """A CPU onnxruntime session with the worker's thread budget (segmenter and score head alike)."""
    try:
        import onnxruntime as ort
    except ImportError:  # torch remains a complete fallback
        return None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = int(os.environ.get("LUSAI_THREADS", torch.get_num_threads()))
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
