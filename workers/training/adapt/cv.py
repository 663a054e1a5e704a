"""Patient-wise nested cross-validation of adaptation, and the final fit on every patient.

Outer folds split patients, never frames or videos, so no patient is both trained and tested.
Inside each outer training set a patient-wise inner split chooses the stopping epoch; the outer
test fold is touched once, by the model that choice produced. The final package is trained on
every patient for the median of the epochs the folds chose, so its one free choice was also made
inside training folds only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from service.core.agreement import Agreement, agreement
from workers.infer.unet import AttentionUNet
from workers.training.adapt.data import Cine, patients
from workers.training.adapt.train import AdaptConfig, FitResult, fit, score_cine

log = logging.getLogger(__name__)


def patient_folds(groups: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """Boolean test masks of ``k`` folds over patients, balanced by count (seeded shuffle)."""
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    rng.shuffle(uniq)
    k = max(2, min(k, len(uniq)))
    return [np.isin(groups, uniq[i::k]) for i in range(k)]


@dataclass
class FoldReport:
    fold: int
    patients: int
    videos: int
    best_epoch: int
    agreement: Agreement
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "fold": self.fold, "patients": self.patients, "videos": self.videos,
            "best_epoch": self.best_epoch, "seconds": round(self.seconds, 1), **self.agreement.__dict__,
        }  # fmt: skip


@dataclass
class CVReport:
    folds: list[FoldReport]
    pooled: Agreement  # every video scored once, by the fold that did not train on its patient
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        def spread(key: str) -> dict[str, float]:
            v = np.array([getattr(f.agreement, key) for f in self.folds], dtype=float)
            return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4),
                    "min": round(float(v.min()), 4), "max": round(float(v.max()), 4)}  # fmt: skip

        return {
            "pooled": self.pooled.__dict__,
            "per_fold": {k: spread(k) for k in ("kappa_quadratic", "exact", "within_one")},
            "folds": [f.to_json() for f in self.folds],
        }


def cross_validate(
    cines: list[Cine],
    segmenter: AttentionUNet,
    cfg: AdaptConfig,
    k: int = 5,
    progress: Callable[[str, int, dict[str, Any]], None] | None = None,
    clock: Callable[[], float] | None = None,
) -> CVReport:
    """Nested patient-wise CV: outer ``k`` folds, an inner quarter of each training set for stopping."""
    import time

    now = clock or time.perf_counter
    groups = patients(cines)
    expert = np.array([c.label.score for c in cines])
    predicted = np.full(len(cines), -1)
    records: list[dict[str, Any]] = [{} for _ in cines]
    folds = []
    for f, test in enumerate(patient_folds(groups, k, cfg.seed)):
        t0 = now()
        train_idx = np.nonzero(~test)[0]
        inner = patient_folds(groups[train_idx], 4, cfg.seed + 1000 + f)[0]
        fit_set = [cines[i] for i in train_idx[~inner]]
        stop_set = [cines[i] for i in train_idx[inner]]

        def step(epoch: int, row: dict[str, Any], f: int = f) -> None:
            if progress is not None:
                progress(f"fold {f + 1}", epoch, row)

        res = fit(fit_set, stop_set, segmenter, cfg, progress=step)
        test_idx = np.nonzero(test)[0]
        for i in test_idx:
            out = score_cine(res.model, res.spec, cines[i])
            predicted[i] = out.score
            records[i] = {
                "sop_instance_uid": cines[i].label.sop_instance_uid, "fold": f + 1,
                "expert": int(expert[i]), "model": out.score, "severity": out.severity,
                "probabilities": list(out.probabilities),
            }  # fmt: skip
        folds.append(
            FoldReport(
                f + 1,
                len(np.unique(groups[test])),
                int(test.sum()),
                res.best_epoch,
                agreement(expert[test], predicted[test]),
                now() - t0,
            )
        )
        log.info("fold %d: Kqwc %.3f", f + 1, folds[-1].agreement.kappa_quadratic)
    return CVReport(folds, agreement(expert, predicted), records)


def final_fit(
    cines: list[Cine],
    segmenter: AttentionUNet,
    cfg: AdaptConfig,
    epochs: int,
    progress: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train on every labelled cine for a number of epochs chosen inside the CV's training folds."""

    def step(epoch: int, row: dict[str, Any]) -> None:
        if progress is not None:
            progress("final", epoch, row)

    return fit(cines, None, segmenter, cfg, epochs=epochs, progress=step)


def chosen_epochs(report: CVReport) -> int:
    return max(1, round(float(np.median([f.best_epoch for f in report.folds]))))
