"""Typed domain objects shared by inference, scoring, the DICOM writers and the API.

They are the contract between stages: ``workers/score`` produces them from masks,
``workers/write_dicom`` turns them into SEG/SR, ``service`` stores them. Keep them free of
torch, pydicom and database imports so every stage can be tested alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from service.core.model_package import ModelInfo


@dataclass(frozen=True)
class FrameFindings:
    """What one frame shows, measured on its class map (scan lines = columns of the B-scan grid)."""

    index: int
    score: int
    pleura_scanlines: int
    b_line_scanlines: int
    b_line_fraction: float
    b_line_count: int
    confluent: bool
    pleura_irregularity: float
    pleura_breaks: int
    a_lines: bool
    consolidation_area_mm2: float
    consolidation_depth_mm: float
    effusion_area_mm2: float
    rib_shadow_scanlines: int = 0  # scan lines under a rib shadow over a third of the depth


@dataclass(frozen=True)
class VideoFindings:
    """Video-level result: the Soldati score by the 1% rule plus the measurements behind it.

    When ``gradable`` is false (workers/score/gradability.py) ``score`` is what the rule gave
    but is not a result: every output reports no score, the reason code and its detail instead.
    """

    score: int
    frame_scores: tuple[int, ...]
    key_frame: int
    b_line_fraction: float
    b_line_count: int
    bla_score: float
    consolidation: bool
    effusion: bool
    consolidation_area_mm2: float
    effusion_area_mm2: float
    pleura_irregular: bool
    frames: tuple[FrameFindings, ...] = field(default=(), repr=False)
    gradable: bool = True
    ungradable_reason: str | None = None  # stable code, a key of workers.score.gradability.REASONS
    ungradable_detail: str | None = None  # the reason with the measured values
    quality: dict[str, float] = field(default_factory=dict)  # gradability measurements
    #: "rule" (thresholds on the measurements) or "learned" (a site-adapted score head decided).
    score_method: str = "rule"
    #: P(score = 0..3) from a learned head; empty for the rule.
    score_probabilities: tuple[float, ...] = ()

    @property
    def reported_score(self) -> int | None:
        """The score as every output states it: None when the cine is not gradable."""
        return self.score if self.gradable else None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["frame_scores"] = list(self.frame_scores)
        d["frames"] = [asdict(f) for f in self.frames]
        return d


@dataclass
class Analysis:
    """Everything one cine's inference produced; ``labels`` is in the source image's pixel grid."""

    sop_instance_uid: str
    frames: int
    findings: VideoFindings
    labels: np.ndarray  # (frames, rows, cols) uint8 of service.core.segments.SegmentClass values
    model: ModelInfo
    timings_ms: dict[str, float]
    probabilities: np.ndarray | None = None  # optional (frames, classes, rows, cols) float16

    @cached_property
    def class_frames(self) -> np.ndarray:
        """(frames, 8) bool: which label values occur in which frame; the SEG writes frames only
        where a segment has pixels and the SR refers only to segments that have some. Computed
        once, on first use (``labels`` must not change afterwards)."""
        return class_presence(self.labels)

    def to_json(self) -> dict[str, Any]:
        """The `lusai analyze --json` line and the API's result body."""
        f = self.findings
        return {
            "sop_instance_uid": self.sop_instance_uid,
            "frames": self.frames,
            "score": f.reported_score,
            "gradable": f.gradable,
            "reason": f.ungradable_reason,
            "reason_detail": f.ungradable_detail,
            "quality": dict(f.quality),
            "score_method": f.score_method,
            "score_probabilities": list(f.score_probabilities),
            "frame_scores": list(f.frame_scores),
            "key_frame": f.key_frame,
            "b_line_fraction": f.b_line_fraction,
            "b_line_count": f.b_line_count,
            "bla_score": f.bla_score,
            "consolidation": f.consolidation,
            "effusion": f.effusion,
            "consolidation_area_mm2": f.consolidation_area_mm2,
            "effusion_area_mm2": f.effusion_area_mm2,
            "pleura_irregular": f.pleura_irregular,
            "model": asdict(self.model),
            "timings_ms": dict(self.timings_ms),
        }


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the milliseconds the block took to ``timings[stage]`` (a job records them per stage)."""
    t = time.perf_counter()
    yield
    timings[stage] = round((time.perf_counter() - t) * 1000.0, 2)


_PRESENCE_CHUNK = 32  # frames per pass: bounds the temporary to 32 frames of the label grid


def class_presence(labels: np.ndarray) -> np.ndarray:
    """(frames, 8) bool of the label values 0-7 present in each frame of ``labels``.

    One vectorised pass (each pixel becomes the bit of its value, OR-reduced per frame) instead of
    one comparison per class: a 1,000-frame 1024x768 cine costs well under a second."""
    labels = np.asarray(labels)
    if labels.size and int(labels.max()) > 7:
        raise ValueError("label values above 7 are not segment classes")
    n = labels.shape[0]
    bits = np.zeros(n, dtype=np.uint8)
    for start in range(0, n, _PRESENCE_CHUNK):
        chunk = labels[start : start + _PRESENCE_CHUNK].reshape(min(_PRESENCE_CHUNK, n - start), -1)
        bits[start : start + len(chunk)] = np.bitwise_or.reduce(np.left_shift(np.uint8(1), chunk), axis=1)
    return np.unpackbits(bits[:, None], axis=1, bitorder="little").astype(bool)
