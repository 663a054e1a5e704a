"""Calibrate the scoring thresholds on labelled real cine (BLUS dev) without touching weights.

The network runs once per video and its grid class maps are cached; then coordinate descent
over a few clinically meaningful cut-offs (each with 2-4 candidate values) maximises the
quadratic-weighted kappa of the video score. Patient-wise 2-fold cross-validation of the same
search estimates how much of the gain is overfitting.

    python -m workers.infer.calibrate /tmp/blus-dicom --cache /tmp/blus-cache
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from workers.infer.evaluate import LabelledItem, agreement, labelled_items, read_mp4_gray
from workers.score.lus import GridSpacing, ScoreConfig, aggregate, frame_findings

log = logging.getLogger(__name__)

#: Candidate values per threshold; the first pass starts from the defaults.
SEARCH: dict[str, tuple[float, ...]] = {
    "b_line_column_fill": (0.3, 0.5, 0.7),
    "confluent_min_mm": (5.0, 10.0, 15.0, 20.0),
    "score1_fraction": (0.0, 0.05, 0.1, 0.2),
    "consolidation_min_mm2": (10.0, 30.0, 60.0, 120.0),
    "consolidation_large_mm": (10.0, 15.0, 20.0),
    "irregular_mm": (0.5, 0.8, 1.2, 2.0),
    "break_min_mm": (2.0, 4.0, 8.0),
    "persist_frames": (1, 3, 5),
    "score3_fraction": (0.5, 0.7, 0.9),
}


@dataclass
class Cached:
    item: LabelledItem
    labels: np.ndarray  # (n, rows, cols) uint8 grid class maps
    spacing: GridSpacing


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
            np.savez_compressed(f, labels=seg.grid_labels, row_mm=sp.row_mm, col_mm=sp.col_mm)
        z = np.load(f)
        out.append(Cached(it, z["labels"], GridSpacing(float(z["row_mm"]), z["col_mm"])))
    return out


def video_scores(data: list[Cached], cfg: ScoreConfig, stride: int = 1) -> np.ndarray:
    """Video scores; ``stride`` > 1 scores every n-th frame only (a faster proxy for the search)."""
    out = []
    for d in data:
        frames = tuple(frame_findings(m, d.spacing, i, cfg) for i, m in enumerate(d.labels[::stride]))
        out.append(aggregate(frames, cfg).score)
    return np.array(out)


def search(
    data: list[Cached], start: ScoreConfig = ScoreConfig(), passes: int = 2, stride: int = 1
) -> ScoreConfig:
    """Coordinate descent on Kqwc; ties keep the current (default-side) value."""
    expert = np.array([d.item.score for d in data])
    best = start
    best_k = agreement(expert, video_scores(data, best, stride)).kappa_quadratic
    for _ in range(passes):
        improved = False
        for name, values in SEARCH.items():
            for v in values:
                cand = dataclasses.replace(best, **{name: type(getattr(best, name))(v)})
                if cand == best:
                    continue
                k = agreement(expert, video_scores(data, cand, stride)).kappa_quadratic
                if k > best_k + 1e-4:
                    best, best_k, improved = cand, k, True
                    log.info("%s=%s -> kappa %.3f", name, v, k)
        if not improved:
            break
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--cache", type=Path, required=True)
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    data = cache_segmentations(a.folder, a.cache, a.weights)
    expert = np.array([d.item.score for d in data])
    default = ScoreConfig()
    report: dict[str, object] = {
        "videos": len(data),
        "default": agreement(expert, video_scores(data, default)).__dict__,
    }
    # Every 2nd frame during the search: with 50-100 frames the 1% rule still needs one frame.
    tuned = search(data, default, stride=2)
    report["calibrated_config"] = {
        k: v for k, v in dataclasses.asdict(tuned).items() if v != getattr(default, k)
    }
    report["calibrated_in_sample"] = agreement(expert, video_scores(data, tuned)).__dict__
    # Patient-wise 2-fold cross-validation of the whole search.
    patients = sorted({d.item.patient for d in data})
    fold = {p: i % 2 for i, p in enumerate(patients)}
    pred = np.zeros(len(data), int)
    for k in (0, 1):
        train = [d for d in data if fold[d.item.patient] != k]
        cfg = search(train, default, passes=1, stride=2)
        test_idx = [i for i, d in enumerate(data) if fold[d.item.patient] == k]
        pred[test_idx] = video_scores([data[i] for i in test_idx], cfg)
    report["calibrated_patient_cv"] = agreement(expert, pred).__dict__
    text = json.dumps(report, indent=2)
    if a.out:
        a.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
