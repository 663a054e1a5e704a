"""Calibrate the scoring thresholds of a network without touching its weights.

Two sources of labelled cine: a site's labelled real cine (a ``labels.csv`` DICOM folder or BLUS
mp4; for local site calibration, never for the shipped package), or ``--phantom N --seed S``: N
synthetic phantom cines, scan-converted and wrapped in DICOM like a scanner's, whose truth is the
Soldati score of their own ground-truth masks at the clinical cut-offs. The shipped operating
point is fitted on the phantom, so the default package carries nothing fitted on real patients.

The network runs once per video and its refined grid class maps are cached; frames are measured
once (:func:`frame_findings` at the default measurement settings), then an exhaustive search over a
few decision cut-offs of :func:`soldati` (each with 3-5 clinically plausible values) maximises
the quadratic-weighted kappa of the video score. Patient-wise 2-fold cross-validation of the same
search, over several random patient splits, estimates what the gain is worth on new patients.
``--write-config`` stores the in-sample operating point in the model package (``--weights``: the
package, default the shipped one), where the pipeline loads it; ``lusai model package`` then
records its new hash (until then the package no longer verifies). In phantom mode ties within
:data:`PHANTOM_SLACK` of the best kappa go to the most conservative cut-offs (the phantom cannot tell
them apart; a real normal lung should not reach score 2-3 on a small spurious finding), and
``--check-seed`` reports agreement on a second, independent phantom set instead of patient CV.

    python -m workers.training.calibrate --phantom 400 --seed 2027 --check-seed 2028 \
        --cache /tmp/phantom-cache --out calibration.json \
        --write-config workers/infer/weights/score_config.json
    lusai model package workers/infer/weights
    python -m workers.training.calibrate SITE_FOLDER --cache /tmp/site-cache --out site.json  # a site's own
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.core.agreement import agreement
from workers.score.lus import GridSpacing, ScoreConfig, frame_findings, soldati, video_findings, video_score
from workers.training.evaluate import LabelledItem, labelled_items

log = logging.getLogger(__name__)

#: Candidate values of the decision cut-offs (measurement settings stay at their defaults).
SEARCH: dict[str, tuple[float, ...]] = {
    "score1_fraction": (0.0, 0.1, 0.2, 0.3, 0.4),
    "score3_fraction": (0.5, 0.7, 0.9),
    "consolidation_min_mm2": (10.0, 100.0, 1000.0),
    "consolidation_large_mm": (10.0, 20.0, 40.0),
    "irregular_mm": (0.8, 2.0, 5.0),
    "persist_s": (0.0, 0.2, 0.4),
}
#: Measurement settings tried too (each needs one more pass over the frames); defaults first.
MEASURE_SEARCH: dict[str, tuple[float, ...]] = {
    "confluent_min_mm": (10.0, 20.0),
    "break_min_mm": (2.0, 5.0),
}
#: Random patient-wise 2-fold splits for the cross-validated estimate.
CV_SPLITS = 3
#: Phantom mode: candidates within this kappa of the best count as equal, the most conservative wins.
PHANTOM_SLACK = 0.005
#: Frames per phantom cine (inclusive range), drawn per cine.
PHANTOM_FRAMES = (16, 24)


@dataclass
class Cached:
    item: LabelledItem
    labels: np.ndarray  # (n, rows, cols) uint8 grid class maps
    spacing: GridSpacing
    frame_rate: float | None = None


@dataclass
class Measured:
    """Per-frame measurements of one video as arrays, for fast re-scoring."""

    expert: int
    patient: str
    features: dict[str, np.ndarray]
    frame_rate: float | None = None


def cache_segmentations(
    folder: Path, cache: Path, weights: Path | None = None, device: str = "cpu"
) -> list[Cached]:
    """Run the network once per labelled video (or reuse ``cache``); unusable videos are skipped."""
    from workers.pipeline import Analyzer, InputError

    cache.mkdir(parents=True, exist_ok=True)
    analyzer: Analyzer | None = None
    out = []
    for it in labelled_items(folder):
        f = cache / f"{it.path.stem}.npz"
        if not f.exists():
            analyzer = analyzer or Analyzer(weights, device)
            try:
                seg = analyzer.segment(it.dataset())
            except InputError as exc:
                log.warning("%s skipped: %s", it.path.name, exc)
                continue
            sp = seg.grid.spacing()
            np.savez_compressed(
                f, labels=seg.grid_labels, row_mm=sp.row_mm, col_mm=sp.col_mm, fps=seg.frame_rate or 0.0
            )
        z = np.load(f)
        fps = float(z["fps"]) if "fps" in z else 0.0
        out.append(Cached(it, z["labels"], GridSpacing(float(z["row_mm"]), z["col_mm"]), fps or None))
    return out


def phantom_segmentations(
    n: int, seed: int, cache: Path, weights: Path | None = None, device: str = "cpu"
) -> list[Cached]:
    """``n`` phantom cines through the pipeline's own segmentation, labelled with their true score.

    Cine ``i`` comes from its own generator ``(seed, i)``, so a cache of a smaller set is reused by
    a larger one. Each is wrapped in DICOM (half JPEG YBR_FULL_422, as most scanners export) and
    segmented by :meth:`Analyzer.segment` (sector detection, grid, network, refinement). Its truth
    is the score of the ground-truth masks, mapped to the grid by the true sector, at the clinical
    cut-offs (:class:`ScoreConfig` defaults): what the phantom draws, not what a network sees.
    """
    import cv2

    from workers.pipeline import Analyzer, InputError
    from workers.preprocess import Grid
    from workers.preprocess.wrap import encode_jpeg_ybr422, frames_to_dataset
    from workers.training.phantom import SCENARIOS, make_cine

    cache.mkdir(parents=True, exist_ok=True)
    analyzer: Analyzer | None = None
    names = list(SCENARIOS)
    out = []
    for i in range(n):
        name = f"phantom-{seed}-{i}"
        f = cache / f"{name}.npz"
        if not f.exists():
            analyzer = analyzer or Analyzer(weights, device)
            rng = np.random.default_rng([seed, i])
            src = (int(rng.integers(220, 420)), int(rng.integers(220, 420)))
            lo, hi = PHANTOM_FRAMES
            cine = make_cine(rng, int(rng.integers(lo, hi + 1)), src, shape=analyzer.predictor.grid_shape)
            ds = frames_to_dataset(cine.frames, mm_per_pixel=cine.sector.mm_per_pixel)
            if rng.random() < 0.5:
                encode_jpeg_ybr422(ds, cine.frames, int(rng.integers(75, 96)))
            truth_grid = Grid(cine.sector, src, analyzer.predictor.grid_shape)
            truth = video_findings(
                truth_grid.to_grid(cine.labels, cv2.INTER_NEAREST), truth_grid.spacing(), ScoreConfig()
            ).score
            try:
                seg = analyzer.segment(ds)
            except InputError as exc:
                log.warning("%s skipped: %s", name, exc)
                continue
            sp = seg.grid.spacing()
            np.savez_compressed(
                f, labels=seg.grid_labels, row_mm=sp.row_mm, col_mm=sp.col_mm, fps=seg.frame_rate or 0.0,
                truth=truth, scenario=names.index(cine.scenario),
            )  # fmt: skip
        z = np.load(f)
        item = LabelledItem(f, int(z["truth"]), name)
        fps = float(z["fps"]) or None
        out.append(Cached(item, z["labels"], GridSpacing(float(z["row_mm"]), z["col_mm"]), fps))
    return out


def video_scores(data: list[Cached], cfg: ScoreConfig) -> np.ndarray:
    """Video scores exactly as the pipeline computes them."""
    return np.array([video_findings(d.labels, d.spacing, cfg, d.frame_rate).score for d in data])


def measure(data: list[Cached], base: ScoreConfig = ScoreConfig()) -> list[Measured]:
    """Frame measurements with no size filter, so any consolidation cut-off can be applied later."""
    cfg = dataclasses.replace(base, consolidation_min_mm2=0.0, effusion_min_mm2=0.0)
    out = []
    for d in data:
        fs = [frame_findings(m, d.spacing, i, cfg) for i, m in enumerate(d.labels)]
        feats = {k: np.array([getattr(f, k) for f in fs]) for k in _FEATURES}
        out.append(Measured(d.item.score, d.item.patient, feats, d.frame_rate))
    return out


_FEATURES = (
    "b_line_fraction",
    "confluent",
    "b_line_count",
    "pleura_breaks",
    "pleura_irregularity",
    "consolidation_area_mm2",
    "consolidation_depth_mm",
)


def rescore(videos: list[Measured], cfg: ScoreConfig) -> np.ndarray:
    """Video scores from cached measurements (same :func:`soldati` and 1% rule as the pipeline)."""
    out = []
    for v in videos:
        f = v.features
        frame_scores = soldati(
            f["b_line_fraction"], f["confluent"], f["b_line_count"], f["pleura_breaks"],
            f["pleura_irregularity"], f["consolidation_area_mm2"], f["consolidation_depth_mm"], cfg,
        )  # fmt: skip
        out.append(video_score(frame_scores, cfg, v.frame_rate)[0])
    return np.array(out)


def candidates(videos: list[Measured], start: ScoreConfig = ScoreConfig()) -> list[tuple[float, ScoreConfig]]:
    """(kappa, config) of ``start`` and of every combination of :data:`SEARCH`, in search order."""
    expert = np.array([v.expert for v in videos])
    out = [(agreement(expert, rescore(videos, start)).kappa_quadratic, start)]
    names = list(SEARCH)
    for values in itertools.product(*(SEARCH[n] for n in names)):
        cand = dataclasses.replace(
            start, **{n: type(getattr(start, n))(v) for n, v in zip(names, values, strict=True)}
        )
        out.append((agreement(expert, rescore(videos, cand)).kappa_quadratic, cand))
    return out


def pick(scored: list[tuple[float, ScoreConfig]], slack: float | None = None) -> tuple[float, ScoreConfig]:
    """The best candidate; ties keep the one met first (the defaults' side). With ``slack``, all
    within ``slack`` of the best kappa tie and the most conservative (:func:`caution`) wins."""
    if slack is None:
        best = scored[0]
        for k, cfg in scored[1:]:
            if k > best[0] + 1e-4:
                best = (k, cfg)
        return best
    top = max(k for k, _ in scored)
    return max((c for c in scored if c[0] >= top - slack), key=lambda c: caution(c[1]))


def caution(cfg: ScoreConfig) -> int:
    """How conservative the cut-offs are: every searched setting scores lower as it grows, so the
    sum over settings of the number of grid values at or below the chosen one."""
    grid = {**MEASURE_SEARCH, **SEARCH}
    return sum(sum(1 for v in values if v <= getattr(cfg, n)) for n, values in grid.items())


def search(
    videos: list[Measured], start: ScoreConfig = ScoreConfig(), slack: float | None = None
) -> ScoreConfig:
    """Exhaustive search of :data:`SEARCH` (see :func:`pick` for ties)."""
    k, best = pick(candidates(videos, start), slack)
    log.info("best kappa %.3f", k)
    return best


Measurements = list[tuple[ScoreConfig, list[Measured]]]


def measure_all(data: list[Cached]) -> Measurements:
    """The videos measured once per combination of :data:`MEASURE_SEARCH` (defaults first)."""
    names = list(MEASURE_SEARCH)
    out = []
    for values in itertools.product(*(MEASURE_SEARCH[n] for n in names)):
        chosen: dict[str, Any] = dict(zip(names, values, strict=True))
        base = dataclasses.replace(ScoreConfig(), **chosen)
        out.append((base, measure(data, base)))
    return out


def search_all(measured: Measurements, idx: list[int], slack: float | None = None) -> tuple[int, ScoreConfig]:
    """Best (measurement index, config) on the videos ``idx`` over every measurement setting."""
    scored: list[tuple[float, int, ScoreConfig]] = []
    for m, (base, videos) in enumerate(measured):
        sub = [videos[i] for i in idx]
        if slack is None:  # the best per measurement; a later measurement must beat it clearly
            k, cfg = pick(candidates(sub, base))
            scored.append((k, m, cfg))
        else:
            scored += [(k, m, cfg) for k, cfg in candidates(sub, base)]
    k, best = pick([(k, cfg) for k, _, cfg in scored], slack)
    m = next(m for _, m, cfg in scored if cfg is best)
    log.info("best kappa %.3f over all measurement settings", k)
    return m, best


def cross_validate(measured: Measurements, report: dict[str, object] | None = None) -> dict[str, object]:
    """Patient-wise 2-fold CV of the whole search over :data:`CV_SPLITS` random patient splits."""
    videos = measured[0][1]
    expert = np.array([v.expert for v in videos])
    patients = sorted({v.patient for v in videos})
    splits = []
    for seed in range(CV_SPLITS):
        perm = np.random.default_rng(seed).permutation(len(patients))
        fold = {patients[i]: int(perm[i] % 2) for i in range(len(patients))}
        pred = np.zeros(len(videos), int)
        for k in (0, 1):
            m, cfg = search_all(measured, [i for i, v in enumerate(videos) if fold[v.patient] != k])
            idx = [i for i, v in enumerate(videos) if fold[v.patient] == k]
            pred[idx] = rescore([measured[m][1][i] for i in idx], cfg)
            if report is not None:
                report[f"split{seed}_fold{k}_config"] = _chosen(cfg)
        splits.append(agreement(expert, pred).__dict__)
    return {
        "splits": splits,
        "mean_kappa_quadratic": round(float(np.mean([s["kappa_quadratic"] for s in splits])), 4),
        "mean_exact": round(float(np.mean([s["exact"] for s in splits])), 4),
        "mean_within_one": round(float(np.mean([s["within_one"] for s in splits])), 4),
    }


def _chosen(cfg: ScoreConfig) -> dict[str, float]:
    return {n: getattr(cfg, n) for n in (*MEASURE_SEARCH, *SEARCH)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path, nargs="?", help="Labelled real cine (labels.csv or severity.csv).")
    ap.add_argument("--phantom", type=int, default=0, help="Fit on this many phantom cines instead.")
    ap.add_argument("--seed", type=int, default=2027, help="Seed of the phantom set (training used 0).")
    ap.add_argument("--check-seed", type=int, help="Phantom mode: also score a second phantom set.")
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--write-config", type=Path, help="Write the calibrated operating point (JSON) here.")
    a = ap.parse_args()
    if (a.folder is None) == (a.phantom <= 0):
        ap.error("give either a labelled FOLDER or --phantom N")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from workers.pipeline import operating_point

    if a.phantom:
        data = phantom_segmentations(a.phantom, a.seed, a.cache, a.weights)
    else:
        data = cache_segmentations(a.folder, a.cache, a.weights)
    slack = PHANTOM_SLACK if a.phantom else None
    measured = measure_all(data)
    videos = measured[0][1]
    expert = np.array([v.expert for v in videos])
    default = ScoreConfig()
    current = operating_point(a.weights)  # what the package holds before this run
    report: dict[str, object] = {
        "source": {"phantom": a.phantom, "seed": a.seed} if a.phantom else str(a.folder),
        "videos": len(videos),
        "truth_counts": np.bincount(expert, minlength=4).tolist(),
        "default": agreement(expert, rescore(videos, default)).__dict__,
        "package_config": _chosen(current),
        "package": agreement(expert, video_scores(data, current)).__dict__,
    }
    m, tuned = search_all(measured, list(range(len(videos))), slack)
    report["calibrated_config"] = _chosen(tuned)
    report["calibrated_in_sample"] = agreement(expert, rescore(measured[m][1], tuned)).__dict__
    if a.phantom and a.check_seed is not None:
        check = phantom_segmentations(a.phantom, a.check_seed, a.cache, a.weights)
        truth = np.array([d.item.score for d in check])
        report["check"] = {
            "seed": a.check_seed,
            "videos": len(check),
            "truth_counts": np.bincount(truth, minlength=4).tolist(),
            "default": agreement(truth, video_scores(check, default)).__dict__,
            "package": agreement(truth, video_scores(check, current)).__dict__,
            "calibrated": agreement(truth, video_scores(check, tuned)).__dict__,
        }
    elif not a.phantom:
        report["calibrated_patient_cv"] = cross_validate(measured, report)
    if a.write_config:
        a.write_config.write_text(json.dumps(_chosen(tuned), indent=2) + "\n")
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
