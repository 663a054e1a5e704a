"""Calibrate the scoring thresholds on labelled real cine (BLUS dev) without touching weights.

The network runs once per video and its refined grid class maps are cached; frames are measured
once (:func:`frame_findings` at the default measurement settings), then an exhaustive search over a
few decision cut-offs of :func:`soldati` (each with 3-5 clinically plausible values) maximises
the quadratic-weighted kappa of the video score. Patient-wise 2-fold cross-validation of the same
search, over several random patient splits, estimates what the gain is worth on new patients.
``--write-config`` stores the in-sample operating point in the model package (``--weights``: the
package, default the shipped one), where the pipeline loads it; ``lusai model package`` then
records its new hash (until then the package no longer verifies).

    python -m workers.infer.calibrate ../shared/datasets/blus-dev --cache /tmp/blus-cache \
        --out calibration.json --write-config workers/infer/weights/score_config.json
    lusai model package workers/infer/weights
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

from workers.infer.evaluate import LabelledItem, agreement, labelled_items, read_mp4_gray
from workers.score.lus import GridSpacing, ScoreConfig, frame_findings, soldati, video_findings, video_score

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
    from workers.preprocess.wrap import frames_to_dataset

    cache.mkdir(parents=True, exist_ok=True)
    analyzer: Analyzer | None = None
    out = []
    for it in labelled_items(folder):
        f = cache / f"{it.path.stem}.npz"
        if not f.exists():
            analyzer = analyzer or Analyzer(weights, device)
            try:
                if it.path.suffix == ".mp4":
                    seg = analyzer.segment(frames_to_dataset(read_mp4_gray(it.path)))
                else:
                    import pydicom

                    seg = analyzer.segment(pydicom.dcmread(it.path))
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


def search(videos: list[Measured], start: ScoreConfig = ScoreConfig()) -> ScoreConfig:
    """Exhaustive search of :data:`SEARCH`; ties keep the candidate met first (the defaults' side)."""
    expert = np.array([v.expert for v in videos])
    best, best_k = start, agreement(expert, rescore(videos, start)).kappa_quadratic
    names = list(SEARCH)
    for values in itertools.product(*(SEARCH[n] for n in names)):
        cand = dataclasses.replace(
            start, **{n: type(getattr(start, n))(v) for n, v in zip(names, values, strict=True)}
        )
        k = agreement(expert, rescore(videos, cand)).kappa_quadratic
        if k > best_k + 1e-4:
            best, best_k = cand, k
    log.info("best kappa %.3f", best_k)
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


def search_all(measured: Measurements, idx: list[int]) -> tuple[int, ScoreConfig]:
    """Best (measurement index, config) on the videos ``idx``: :func:`search` per measurement."""
    best: tuple[float, int, ScoreConfig] = (-2.0, 0, measured[0][0])
    for m, (base, videos) in enumerate(measured):
        sub = [videos[i] for i in idx]
        cfg = search(sub, base)
        k = agreement(np.array([v.expert for v in sub]), rescore(sub, cfg)).kappa_quadratic
        if k > best[0] + 1e-4:
            best = (k, m, cfg)
    return best[1], best[2]


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
    ap.add_argument("folder", type=Path)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--write-config", type=Path, help="Write the calibrated operating point (JSON) here.")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = cache_segmentations(a.folder, a.cache, a.weights)
    measured = measure_all(data)
    videos = measured[0][1]
    expert = np.array([v.expert for v in videos])
    default = ScoreConfig()
    report: dict[str, object] = {
        "videos": len(videos),
        "default": agreement(expert, rescore(videos, default)).__dict__,
    }
    m, tuned = search_all(measured, list(range(len(videos))))
    report["calibrated_config"] = _chosen(tuned)
    report["calibrated_in_sample"] = agreement(expert, rescore(measured[m][1], tuned)).__dict__
    report["calibrated_patient_cv"] = cross_validate(measured, report)
    if a.write_config:
        a.write_config.write_text(json.dumps(_chosen(tuned), indent=2) + "\n")
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
