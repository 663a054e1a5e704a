"""One cine in, one :class:`Analysis` out: decode -> sector -> grid -> segment -> score -> labels.

A worker process builds one :class:`Analyzer` (loading the network once) and calls
:meth:`Analyzer.analyze` per dataset. Every stage is timed into ``Analysis.timings_ms``.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from service.core.dicom import US_SOP_CLASSES
from service.core.model_package import DEFAULT_PACKAGE, ModelInfo, ModelPackage, load_package
from workers.domain import Analysis, VideoFindings, timed
from workers.infer.predict import Predictor
from workers.infer.refine import RefineConfig, refine
from workers.infer.scorer import LearnedScorer, ScoreOutput
from workers.preprocess import Grid, InputError, decode_frames, detect_sector, frame_rate
from workers.score.gradability import with_gradability
from workers.score.lus import ScoreConfig, load_score_config, video_findings

__all__ = ["Analyzer", "InputError", "Segmentation"]

log = logging.getLogger(__name__)


class Analyzer:
    """Loads the model once per worker process; thread-compatible, not thread-safe."""

    def __init__(
        self,
        package: ModelPackage | Path | str | None = None,
        device: str = "auto",
        score_config: ScoreConfig | None = None,
        keep_probabilities: bool = False,
        refine_config: RefineConfig = RefineConfig(),
    ):
        self.predictor = Predictor(package, device)
        self.package = self.predictor.package
        self.score_config = score_config or operating_point(self.package)
        self.refine_config = refine_config
        self.keep_probabilities = keep_probabilities
        self.model: ModelInfo = self.package.model_info
        self.scorer = _learned_scorer(self.package, self.predictor.device)

    def analyze_file(self, path: Path | str) -> Analysis:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            raise InputError(f"not a readable DICOM file ({type(exc).__name__})") from exc
        return self.analyze(ds)

    def analyze(self, ds: pydicom.Dataset) -> Analysis:
        """Segment and score every frame; raises :class:`InputError` for unusable input."""
        seg = self.segment(ds)
        timings = seg.timings_ms
        with timed(timings, "score"):
            findings = video_findings(seg.grid_labels, seg.grid.spacing(), self.score_config, seg.frame_rate)
            findings = with_gradability(findings, seg.grid_frames)
        if self.scorer is not None:
            with timed(timings, "score_head"):
                findings = _learned_score(findings, self.scorer.score(seg.grid_frames, seg.grid.valid_mask()))
        with timed(timings, "labels"):
            labels = seg.grid.to_source(seg.grid_labels)
            probs = _probs_to_source(seg.grid, seg.probabilities) if seg.probabilities is not None else None
        timings["total"] = round(sum(timings.values()), 2)
        f = findings
        verdict = f"score {f.score}" if f.gradable else f"not gradable ({f.ungradable_reason})"
        log.info("analysed %d frames: %s in %.0f ms", labels.shape[0], verdict, timings["total"])
        return Analysis(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
            frames=int(labels.shape[0]),
            findings=findings,
            labels=labels,
            model=self.model,
            timings_ms=timings,
            probabilities=probs,
        )

    def segment(self, ds: pydicom.Dataset) -> Segmentation:
        """Class maps in the working grid, before scoring (used by threshold calibration)."""
        sop_class = ds.get("SOPClassUID")
        if sop_class not in US_SOP_CLASSES:
            raise InputError(f"SOP class {sop_class or '(none)'} is not an ultrasound image")
        timings: dict[str, float] = {}
        with timed(timings, "decode"):
            frames = decode_frames(ds)
        with timed(timings, "preprocess"):
            sector = detect_sector(frames, ds)
            grid = Grid(sector, (frames.shape[1], frames.shape[2]), self.predictor.grid_shape)
            grid_frames = grid.to_grid(frames)
        with timed(timings, "infer"):
            grid_labels, probs = self.predictor.predict(grid_frames, probabilities=self.keep_probabilities)
        with timed(timings, "refine"):
            grid_labels = refine(grid_frames, grid_labels, self.refine_config)
        return Segmentation(grid, grid_frames, grid_labels, probs, timings, frame_rate(ds))


def _learned_scorer(package: ModelPackage, device: str) -> LearnedScorer | None:
    """The package's site-adapted score head, when it has one (``lusai adapt`` packages do)."""
    weights = package.file("scorer_torch")
    if weights is None:
        return None
    return LearnedScorer(weights, package.file("scorer_onnx"), device)


def _learned_score(findings: VideoFindings, out: ScoreOutput) -> VideoFindings:
    """The head decides the score and the frame scores; measurements and gradability stay the rule's.

    The key frame becomes the frame the head found most severe, so the SR's key-frame ROI shows
    the frame behind the learned decision.
    """
    return dataclasses.replace(
        findings,
        score=out.score,
        frame_scores=tuple(int(s) for s in out.frame_scores),
        key_frame=int(np.argmax(out.frame_severity)),
        score_method="learned",
        score_probabilities=out.probabilities,
    )


def operating_point(package: ModelPackage | Path | str | None = None) -> ScoreConfig:
    """The score thresholds the package calibrated for its network (role ``score_config``), or
    the clinical defaults if it has none."""
    pkg = package if isinstance(package, ModelPackage) else load_package(package or DEFAULT_PACKAGE)
    path = pkg.file("score_config")
    return load_score_config(path) if path is not None else ScoreConfig()


@dataclass
class Segmentation:
    grid: Grid
    grid_frames: np.ndarray  # (n, rows, cols) uint8 network input
    grid_labels: np.ndarray  # (n, rows, cols) uint8 class maps
    probabilities: np.ndarray | None  # (n, classes, rows, cols) float16 in the grid
    timings_ms: dict[str, float]
    frame_rate: float | None = None  # frames/s stated by the source, for the persistence rule


def _probs_to_source(grid: Grid, probs: np.ndarray) -> np.ndarray:
    n, c = probs.shape[:2]
    flat = grid.to_source(probs.reshape(n * c, *probs.shape[2:]))
    return flat.reshape(n, c, *flat.shape[1:])
