"""Agreement metrics and labelled-folder readers for `lusai eval` and the model card."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


def quadratic_kappa(a: np.ndarray, b: np.ndarray, n_levels: int = 4) -> float:
    """Cohen's kappa with quadratic weights (Kqwc), the usual agreement measure for LUS scores."""
    a, b = np.asarray(a, int), np.asarray(b, int)
    obs = np.zeros((n_levels, n_levels))
    np.add.at(obs, (a, b), 1)
    w = (np.subtract.outer(np.arange(n_levels), np.arange(n_levels)) ** 2) / (n_levels - 1) ** 2
    exp = np.outer(obs.sum(1), obs.sum(0)) / max(obs.sum(), 1)
    denom = (w * exp).sum()
    return float(1 - (w * obs).sum() / denom) if denom else 1.0


@dataclass(frozen=True)
class Agreement:
    n: int
    kappa_quadratic: float
    exact: float
    within_one: float
    confusion: list[list[int]]  # rows = expert, columns = model


def agreement(expert: np.ndarray, model: np.ndarray) -> Agreement:
    expert, model = np.asarray(expert, int), np.asarray(model, int)
    conf = np.zeros((4, 4), int)
    np.add.at(conf, (expert, model), 1)
    return Agreement(
        n=int(expert.size),
        kappa_quadratic=round(quadratic_kappa(expert, model), 4),
        exact=round(float((expert == model).mean()), 4),
        within_one=round(float((np.abs(expert - model) <= 1).mean()), 4),
        confusion=conf.tolist(),
    )


@dataclass(frozen=True)
class LabelledItem:
    path: Path
    score: int
    patient: str

    def dataset(self) -> Any:
        """The cine as a DICOM dataset: the file itself, or an mp4 wrapped as a scanner would."""
        import pydicom

        from workers.preprocess.wrap import frames_to_dataset

        if self.path.suffix == ".mp4":
            return frames_to_dataset(read_mp4_gray(self.path))
        return pydicom.dcmread(self.path)


def labelled_items(folder: Path) -> Iterator[LabelledItem]:
    """DICOM files with ``labels.csv`` (blus_to_dicom.py) or mp4 videos with ``severity.csv`` (BLUS)."""
    if (folder / "labels.csv").exists():
        with open(folder / "labels.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                name = row["file"]
                yield LabelledItem(folder / name, int(row["score"]), _patient(name))
    elif (folder / "severity.csv").exists():
        videos = folder / "lus_videos" if (folder / "lus_videos").is_dir() else folder
        with open(folder / "severity.csv", newline="") as fh:
            for row in csv.DictReader(fh):
                name = row["video_file"].strip()
                yield LabelledItem(videos / f"{name}.mp4", int(float(row["Severity Score"])), _patient(name))
    else:
        raise FileNotFoundError(f"{folder} has neither labels.csv nor severity.csv")


def _patient(name: str) -> str:
    parts = Path(name).stem.split("_")
    return parts[1] if len(parts) > 1 else parts[0]


def read_mp4_gray(path: Path) -> np.ndarray:
    """All frames of a video as ``(n, rows, cols)`` uint8 luminance."""
    import cv2

    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY))
    cap.release()
    if not frames:
        raise ValueError(f"no frames in {path.name}")
    return np.stack(frames)
