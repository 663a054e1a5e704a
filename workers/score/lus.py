"""Masks -> :class:`FrameFindings` -> :class:`VideoFindings` with the Soldati score (0-3).

Works on class maps in the polar working grid (rows = depth, columns = scan lines), so a
B-line is a set of columns and the B-line fraction is the share of pleural scan lines they cover.
Pure numpy, no I/O: the Celery task, the CLI and the evaluation all call the same functions.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.core.segments import SegmentClass
from workers.domain import FrameFindings, VideoFindings

C = SegmentClass


@dataclass(frozen=True)
class GridSpacing:
    """Size of grid cells: ``row_mm`` in depth, ``col_mm[row]`` laterally (convex fans widen)."""

    row_mm: float
    col_mm: np.ndarray  # (rows,) float

    def cell_area_mm2(self) -> np.ndarray:
        return self.row_mm * self.col_mm

    @staticmethod
    def uniform(rows: int, row_mm: float = 1.0, col_mm: float = 1.0) -> GridSpacing:
        return GridSpacing(row_mm, np.full(rows, col_mm, dtype=np.float64))


#: Frame rate assumed for cine without FrameTime/CineRate (typical LUS cine, and BLUS).
DEFAULT_FRAME_RATE = 25.0


@dataclass(frozen=True)
class ScoreConfig:
    """Every threshold of the scoring rule. Defaults are the clinical cut-offs (Soldati), used to
    score phantom ground truth; a model ships its own operating point (``score_config.json`` beside
    the weights, see :func:`load_score_config`): the default one fitted on the phantom, a site's on
    its own labelled cine (``workers.training.calibrate``).

    Fractions refer to pleural scan lines, sizes to millimetres at the pleura.
    """

    #: A scan line carries a B-line when this share of its rows below the pleura is B-line.
    b_line_column_fill: float = 0.3
    #: B-line runs closer than this (mm at the pleura) are one B-line (speckle gaps).
    b_line_merge_mm: float = 1.5
    #: A run at least this wide (mm at the pleura) is confluent B-lines rather than one line.
    confluent_min_mm: float = 10.0
    #: Score 1 needs at least this share of pleural scan lines under B-lines.
    score1_fraction: float = 0.0
    #: Confluent B-lines over more than this share of the pleura is "white lung" (score 3).
    score3_fraction: float = 0.5
    #: Consolidations smaller than this area (mm^2) are ignored as noise.
    consolidation_min_mm2: float = 10.0
    #: Consolidations at least this deep (mm) count as large (score 3).
    consolidation_large_mm: float = 10.0
    #: Effusions smaller than this area (mm^2) are ignored.
    effusion_min_mm2: float = 20.0
    #: Pleural gaps at least this wide (mm) count as breaks.
    break_min_mm: float = 2.0
    #: Pleural depth residual (mm, std about a smooth fit) above which the line is irregular.
    irregular_mm: float = 0.8
    #: Frames needed with a score for the video to take it (the 1% rule).
    min_frame_fraction: float = 0.01
    #: A frame score counts only when it persists this long (seconds of consecutive frames, 0 = off):
    #: real B-lines last through the breathing cycle, a noisy frame does not.
    persist_s: float = 0.0
    #: Minimum pleural scan lines for a frame to be scored at all.
    min_pleura_columns: int = 4


def load_score_config(path: Path) -> ScoreConfig:
    """A :class:`ScoreConfig` from JSON (unknown keys are an error, missing keys keep defaults)."""
    values = json.loads(path.read_text())
    unknown = set(values) - {f.name for f in dataclasses.fields(ScoreConfig)}
    if unknown:
        raise ValueError(f"{path.name}: unknown score settings {sorted(unknown)}")
    defaults = ScoreConfig()
    return dataclasses.replace(defaults, **{k: type(getattr(defaults, k))(v) for k, v in values.items()})


def frame_findings(
    labels: np.ndarray, spacing: GridSpacing, index: int = 0, cfg: ScoreConfig = ScoreConfig()
) -> FrameFindings:
    """Measure one ``(rows, cols)`` class map and give it its Soldati score."""
    rows, cols = labels.shape
    pleura = labels == C.PLEURAL_LINE
    has_pleura = pleura.any(axis=0)
    shadow_cols = (labels == C.RIB_SHADOW).sum(axis=0) > rows // 3
    pleura_depth = np.where(has_pleura, np.argmax(pleura, axis=0), -1)
    if has_pleura.sum() < cfg.min_pleura_columns:
        return _empty(index, labels, spacing, cfg)
    idx = np.nonzero(has_pleura)[0]
    extent = np.zeros(cols, dtype=bool)
    extent[idx[0] : idx[-1] + 1] = True
    extent &= ~shadow_cols
    n_pleura = int(extent.sum())
    ref_row = int(np.median(pleura_depth[has_pleura]))
    col_mm = float(spacing.col_mm[min(ref_row, rows - 1)])

    # B-lines: columns whose below-pleura part is mostly B-line.
    filled = np.maximum(fill_depth(pleura_depth, has_pleura).astype(np.int64), 0)
    below = np.arange(rows)[:, None] > filled[None, :]
    bl = (labels == C.B_LINE) & below
    span = np.maximum(below.sum(axis=0), 1)
    b_cols = extent & (bl.sum(axis=0) >= cfg.b_line_column_fill * span)
    runs = _runs(_close_gaps(b_cols, round(cfg.b_line_merge_mm / col_mm)))
    widths_mm = [(e - s) * col_mm for s, e in runs]
    confluent = any(w >= cfg.confluent_min_mm for w in widths_mm)
    b_fraction = float(b_cols.sum() / max(n_pleura, 1))

    # Pleural line: irregular depth profile and gaps not explained by rib shadows.
    irregularity = _irregularity_mm(pleura_depth, has_pleura, spacing.row_mm)
    gaps = _runs(extent & ~has_pleura)
    breaks = sum(1 for s, e in gaps if (e - s) * col_mm >= cfg.break_min_mm)

    cons_area, cons_depth = _area_depth(labels == C.CONSOLIDATION, spacing)
    eff_area, _ = _area_depth(labels == C.EFFUSION, spacing)
    a_lines = bool((labels == C.A_LINE).any(axis=0).sum() >= max(3, 0.1 * n_pleura))
    if cons_area < cfg.consolidation_min_mm2:
        cons_area, cons_depth = 0.0, 0.0
    if eff_area < cfg.effusion_min_mm2:
        eff_area = 0.0

    f = FrameFindings(
        index=index,
        score=0,
        pleura_scanlines=n_pleura,
        b_line_scanlines=int(b_cols.sum()),
        b_line_fraction=round(b_fraction, 4),
        b_line_count=len(runs),
        confluent=confluent,
        pleura_irregularity=round(irregularity, 3),
        pleura_breaks=breaks,
        a_lines=a_lines,
        consolidation_area_mm2=round(cons_area, 1),
        consolidation_depth_mm=round(cons_depth, 1),
        effusion_area_mm2=round(eff_area, 1),
        rib_shadow_scanlines=int(shadow_cols.sum()),
    )
    return dataclasses.replace(f, score=_frame_score(f, cfg))


def soldati(
    b_fraction: np.ndarray | float,
    confluent: np.ndarray | bool,
    b_count: np.ndarray | int,
    breaks: np.ndarray | int,
    irregularity: np.ndarray | float,
    cons_area: np.ndarray | float,
    cons_depth: np.ndarray | float,
    cfg: ScoreConfig,
) -> np.ndarray:
    """The Soldati frame score from measurements; works on scalars and on arrays of frames.

    3: confluent B-lines over more than half the pleura, or a large consolidation.
    2: a consolidation, or confluent B-lines with a broken or irregular pleura.
    1: B-lines. 0: none of these (A-line pattern or nothing seen).
    """
    cons = (np.asarray(cons_area) > 0) & (np.asarray(cons_area) >= cfg.consolidation_min_mm2)
    conf = np.asarray(confluent, dtype=bool)
    s3 = (conf & (np.asarray(b_fraction) > cfg.score3_fraction)) | (
        cons & (np.asarray(cons_depth) >= cfg.consolidation_large_mm)
    )
    abnormal = (np.asarray(breaks) > 0) | (np.asarray(irregularity) > cfg.irregular_mm)
    s2 = cons | (conf & abnormal)
    s1 = (np.asarray(b_count) > 0) & (np.asarray(b_fraction) >= cfg.score1_fraction)
    return np.where(s3, 3, np.where(s2, 2, np.where(s1, 1, 0)))


def _frame_score(f: FrameFindings, cfg: ScoreConfig) -> int:
    return int(
        soldati(
            f.b_line_fraction,
            f.confluent,
            f.b_line_count,
            f.pleura_breaks,
            f.pleura_irregularity,
            f.consolidation_area_mm2,
            f.consolidation_depth_mm,
            cfg,
        )
    )


def video_score(
    frame_scores: np.ndarray, cfg: ScoreConfig = ScoreConfig(), frame_rate: float | None = None
) -> tuple[int, np.ndarray]:
    """(video score, per-frame scores after the persistence filter): the 1% rule.

    ``frame_rate`` (frames/s) turns :attr:`ScoreConfig.persist_s` into frames; cine that does not
    state its timing is taken at :data:`DEFAULT_FRAME_RATE`.
    """
    rate = frame_rate if frame_rate and frame_rate > 0 else DEFAULT_FRAME_RATE
    persistent = _persistent(np.asarray(frame_scores), max(1, round(cfg.persist_s * rate)))
    need = max(1, int(np.ceil(cfg.min_frame_fraction * len(persistent))))
    for s in (3, 2, 1):
        if (persistent >= s).sum() >= need:
            return s, persistent
    return 0, persistent


def video_findings(
    labels: np.ndarray,
    spacing: GridSpacing,
    cfg: ScoreConfig = ScoreConfig(),
    frame_rate: float | None = None,
) -> VideoFindings:
    """Score a cine ``(frames, rows, cols)``: the highest score held by >= 1% of its frames."""
    frames = tuple(frame_findings(m, spacing, i, cfg) for i, m in enumerate(labels))
    return aggregate(frames, cfg, frame_rate)


def aggregate(
    frames: tuple[FrameFindings, ...], cfg: ScoreConfig = ScoreConfig(), frame_rate: float | None = None
) -> VideoFindings:
    """Video findings from frame findings (separate so thresholds can be re-tuned without masks)."""
    if not frames:
        raise ValueError("a video needs at least one frame")
    raw = np.array([f.score for f in frames])
    score, persistent = video_score(raw, cfg, frame_rate)
    need = max(1, int(np.ceil(cfg.min_frame_fraction * len(frames))))
    candidates = [f for f, p in zip(frames, persistent, strict=True) if p == score] or list(frames)
    key = max(candidates, key=lambda f: (f.b_line_fraction, f.consolidation_area_mm2, -f.index))
    frac = np.array([f.b_line_fraction for f in frames])
    cons = np.array([f.consolidation_area_mm2 for f in frames])
    eff = np.array([f.effusion_area_mm2 for f in frames])
    irregular = np.array([f.pleura_irregularity for f in frames]) > cfg.irregular_mm
    return VideoFindings(
        score=score,
        frame_scores=tuple(int(s) for s in raw),
        key_frame=key.index,
        b_line_fraction=round(float(frac.max()), 4),
        b_line_count=int(max(f.b_line_count for f in frames)),
        bla_score=round(float(frac.mean() * 100.0), 2),
        consolidation=bool((cons > 0).sum() >= need),
        effusion=bool((eff > 0).sum() >= need),
        consolidation_area_mm2=round(float(cons.max()), 1),
        effusion_area_mm2=round(float(eff.max()), 1),
        pleura_irregular=bool(irregular.sum() >= need),
        frames=frames,
    )


def _persistent(scores: np.ndarray, k: int) -> np.ndarray:
    """Score each frame by the lowest score in the best window of ``k`` frames containing it."""
    if k <= 1 or scores.size < k:
        return scores
    win = np.lib.stride_tricks.sliding_window_view(scores, k).min(axis=1)
    out = np.zeros_like(scores)
    for start, v in enumerate(win):
        out[start : start + k] = np.maximum(out[start : start + k], v)
    return out


def _empty(index: int, labels: np.ndarray, spacing: GridSpacing, cfg: ScoreConfig) -> FrameFindings:
    """No pleura seen: only consolidation (lobar, pleura not visible) can still score."""
    cons_area, cons_depth = _area_depth(labels == C.CONSOLIDATION, spacing)
    eff_area, _ = _area_depth(labels == C.EFFUSION, spacing)
    cons_area = cons_area if cons_area >= cfg.consolidation_min_mm2 else 0.0
    f = FrameFindings(
        index, 0, 0, 0, 0.0, 0, False, 0.0, 0, False,
        round(cons_area, 1), round(cons_depth if cons_area else 0.0, 1),
        round(eff_area if eff_area >= cfg.effusion_min_mm2 else 0.0, 1),
        int(((labels == C.RIB_SHADOW).sum(axis=0) > labels.shape[0] // 3).sum()),
    )  # fmt: skip
    return dataclasses.replace(f, score=_frame_score(f, cfg))


def fill_depth(depth: np.ndarray, has: np.ndarray) -> np.ndarray:
    """Pleural depth (float rows) for every scan line, interpolated across the gaps in ``has``."""
    idx = np.nonzero(has)[0]
    return np.interp(np.arange(depth.size), idx, depth[idx])


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open (start, end) of each run of True."""
    d = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    return list(zip(np.nonzero(d == 1)[0].tolist(), np.nonzero(d == -1)[0].tolist(), strict=True))


def _close_gaps(mask: np.ndarray, gap: int) -> np.ndarray:
    out = mask.copy()
    runs = _runs(mask)
    for (_, e), (s, _) in itertools.pairwise(runs):
        if s - e <= gap:
            out[e:s] = True
    return out


def _irregularity_mm(depth: np.ndarray, has: np.ndarray, row_mm: float) -> float:
    """Std of pleural depth about a quadratic fit: chest curvature is smooth, disease is not."""
    x = np.nonzero(has)[0]
    if x.size < 8:
        return 0.0
    y = depth[x].astype(np.float64)
    resid = y - np.polyval(np.polyfit(x, y, 2), x)
    return float(resid.std() * row_mm)


def _area_depth(mask: np.ndarray, spacing: GridSpacing) -> tuple[float, float]:
    if not mask.any():
        return 0.0, 0.0
    area = float((mask.sum(axis=1) * spacing.cell_area_mm2()).sum())
    depth = float(mask.sum(axis=0).max() * spacing.row_mm)
    return area, depth
