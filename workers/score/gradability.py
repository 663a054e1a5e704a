"""Can this cine be graded at all? Frame findings + network input -> :class:`Gradability`.

A Soldati score is read at the pleural line; when the probe is off the chest, the image is noise,
or ribs hide the pleura, the scorer would still give a number (usually 0) and that number would
look like a finding. :func:`assess` says "not gradable" with a stable reason code instead.

Checks, in order (the first that fails is the reason):

* ``too-few-frames``: a still image or a fragment cannot show B-line persistence or sliding;
* ``no-contact``: most frames have almost no echoes (probe in the air, no gel, frozen dark frame);
* ``noise``: most frames have no spatial structure (speckle is correlated between neighbouring
  cells of the grid, electronic noise or a corrupt stream is not);
* ``rib-shadow`` / ``no-pleura``: the pleural line is found on too few frames, and no
  consolidation or effusion was found either (those are graded without a visible pleural line).
  Rib shadows covering most scan lines name the reason ``rib-shadow``.

The image checks come first because the network finds "pleura" in noise and in dark fans.
Thresholds are deliberately far from what real, expert-scored cine shows (docs/model-card.md,
"Gradability"): the flag is for unusable input, not for hard cases. Pure numpy, no I/O.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass

import numpy as np

from workers.domain import FrameFindings, VideoFindings

#: Reason code -> what it means (also the meaning of its coded concept in the SR).
REASONS: dict[str, str] = {
    "too-few-frames": "Too few frames for a cine score",
    "no-contact": "No tissue echoes (no probe contact)",
    "noise": "Image without tissue structure (noise)",
    "rib-shadow": "Pleural line hidden by rib shadows",
    "no-pleura": "Pleural line not visible",
}


@dataclass(frozen=True)
class GradabilityConfig:
    """Thresholds of :func:`assess`. Fractions are of frames unless they say scan lines."""

    #: Frames needed: the 1% rule and the persistence filter are about a clip; one or two frames
    #: are a still image (single-frame US objects are accepted by the pipeline, not graded).
    min_frames: int = 3
    #: A grid cell with at least this 8-bit value is an echo. Real LUS (BLUS dev) has a median of
    #: >= 38% such cells per frame in every cine; a probe in the air shows only the noise floor.
    echo_level: int = 20
    #: A frame has tissue contact when at least this share of its imaged cells are echoes
    #: (a quarter of the lowest real cine's median, so a dim or deep setting is not flagged).
    min_echo_fraction: float = 0.1
    #: Not gradable when fewer than this share of frames have contact (the odd blank frame of a
    #: recording, up to 3.4% of frames in BLUS dev, does not count against a cine).
    min_contact_fraction: float = 0.5
    #: A frame has tissue structure when the correlation of neighbouring grid cells (mean of the
    #: lateral and depth lag-1 correlations) reaches this: >= 0.85 on every real cine, ~0 on noise.
    min_structure: float = 0.5
    #: Not gradable when fewer than this share of frames have structure.
    min_structured_fraction: float = 0.5
    #: The pleural line is visible on a frame when it spans at least this share of scan lines
    #: (``FrameFindings.pleura_scanlines``; an intercostal window is usually a third or more).
    min_pleura_width: float = 0.1
    #: Not gradable when the pleural line is visible on fewer than this share of frames and no
    #: consolidation or effusion was found (a lobar consolidation hides the pleura and scores 3).
    min_pleura_fraction: float = 0.1
    #: Among cines failing the pleura check, rib shadows over at least this share of scan lines
    #: (median frame) make the reason ``rib-shadow`` rather than ``no-pleura``.
    rib_shadow_fraction: float = 0.5


@dataclass(frozen=True)
class Gradability:
    """The verdict and the measurements behind it (all fractions in 0..1)."""

    gradable: bool
    reason: str | None  # a key of REASONS, None when gradable
    detail: str | None  # the reason with the measured values, for people
    frames: int
    contact_fraction: float  # frames with tissue echoes
    structured_fraction: float  # frames with speckle structure
    pleura_visible_fraction: float  # frames with the pleural line over min_pleura_width
    pleura_width: float  # median share of scan lines under the pleural line
    rib_shadow_fraction: float  # median share of scan lines under rib shadows
    lesion_frames: int  # frames with a consolidation or effusion above the score's size cut-offs

    def measures(self) -> dict[str, float]:
        """The measurements alone (for the API's and the CLI's ``quality`` object)."""
        return {k: v for k, v in asdict(self).items() if k not in ("gradable", "reason", "detail")}


def echo_fractions(grid_frames: np.ndarray, echo_level: int) -> np.ndarray:
    """Share of imaged cells that are echoes, per frame. Cells that are 0 on every frame lie
    outside the source image (a fan clipped by the image border) and are not counted."""
    imaged = grid_frames.max(axis=0) > 0
    if not imaged.any():
        return np.zeros(grid_frames.shape[0])
    return (grid_frames[:, imaged] >= echo_level).mean(axis=1)


def structure(grid_frames: np.ndarray) -> np.ndarray:
    """Mean of lateral and depth lag-1 correlation per frame (0 for a flat frame)."""
    g = grid_frames.astype(np.float32)
    out = np.zeros(g.shape[0])
    for i, f in enumerate(g):
        out[i] = 0.5 * (_corr(f[:, :-1], f[:, 1:]) + _corr(f[:-1], f[1:]))
    return out


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a = a.ravel() - a.mean()
    b = b.ravel() - b.mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else 0.0


def assess(
    frames: tuple[FrameFindings, ...], grid_frames: np.ndarray, cfg: GradabilityConfig = GradabilityConfig()
) -> Gradability:
    """Whether the cine can be graded; ``grid_frames`` is the network input ``(n, rows, cols)``."""
    if grid_frames.ndim != 3 or grid_frames.shape[0] != len(frames):
        raise ValueError(f"grid_frames {grid_frames.shape} do not match {len(frames)} frame findings")
    n, _, cols = grid_frames.shape
    contact = (
        float((echo_fractions(grid_frames, cfg.echo_level) >= cfg.min_echo_fraction).mean()) if n else 0.0
    )
    structured = float((structure(grid_frames) >= cfg.min_structure).mean()) if n else 0.0
    pleura = np.array([f.pleura_scanlines for f in frames], dtype=np.float64) / max(cols, 1)
    shadow = np.array([f.rib_shadow_scanlines for f in frames], dtype=np.float64) / max(cols, 1)
    visible = float((pleura >= cfg.min_pleura_width).mean()) if n else 0.0
    lesion = sum(1 for f in frames if f.consolidation_area_mm2 > 0 or f.effusion_area_mm2 > 0)
    shadow_median = float(np.median(shadow)) if n else 0.0

    reason, detail = None, None
    if n < cfg.min_frames:
        reason, detail = "too-few-frames", f"{n} frame(s), at least {cfg.min_frames} needed"
    elif contact < cfg.min_contact_fraction:
        reason = "no-contact"
        detail = f"tissue echoes on {contact:.0%} of frames (at least {cfg.min_contact_fraction:.0%} needed)"
    elif structured < cfg.min_structured_fraction:
        reason = "noise"
        need = cfg.min_structured_fraction
        detail = f"speckle structure on {structured:.0%} of frames (at least {need:.0%} needed)"
    elif visible < cfg.min_pleura_fraction and lesion == 0:
        reason = "rib-shadow" if shadow_median >= cfg.rib_shadow_fraction else "no-pleura"
        detail = (
            f"pleural line over {cfg.min_pleura_width:.0%} of scan lines on {visible:.0%} of frames"
            f" (at least {cfg.min_pleura_fraction:.0%} needed); rib shadows over {shadow_median:.0%}"
            " of scan lines"
        )
    return Gradability(
        gradable=reason is None,
        reason=reason,
        detail=detail,
        frames=n,
        contact_fraction=round(contact, 4),
        structured_fraction=round(structured, 4),
        pleura_visible_fraction=round(visible, 4),
        pleura_width=round(float(np.median(pleura)) if n else 0.0, 4),
        rib_shadow_fraction=round(shadow_median, 4),
        lesion_frames=lesion,
    )


def with_gradability(
    findings: VideoFindings, grid_frames: np.ndarray, cfg: GradabilityConfig = GradabilityConfig()
) -> VideoFindings:
    """``findings`` with the verdict of :func:`assess` on its frames (what the pipeline calls)."""
    g = assess(findings.frames, grid_frames, cfg)
    return dataclasses.replace(
        findings,
        gradable=g.gradable,
        ungradable_reason=g.reason,
        ungradable_detail=g.detail,
        quality=g.measures(),
    )
