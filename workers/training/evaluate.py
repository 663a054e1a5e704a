"""Labelled-folder readers for `lusai eval`, calibration and the model card."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


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
