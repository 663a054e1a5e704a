"""A site's labelled cine for adaptation: the labels CSV, its DICOM files, and the grid frames.

The CSV names instances by SOP Instance UID (what a PACS export or ``lusai reviews export`` gives),
so the files may be named and nested any way. Rows without a file and files without a row are
reported, never fatal. Free-text expert comments become weak finding labels for auxiliary targets.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from workers.infer.scorer import AUX_FINDINGS
from workers.preprocess import Grid, InputError, decode_frames, detect_sector, frame_rate
from workers.preprocess.grid import GridShape

log = logging.getLogger(__name__)

#: Comment patterns of the weak finding labels (1 when matched; see :func:`weak_findings`).
_PATTERNS: dict[str, re.Pattern[str]] = {
    "pleura_abnormal": re.compile(r"broken|irregular|thicken|indent|interrupt|fragment", re.I),
    "consolidation": re.compile(r"consolid", re.I),
    "confluent": re.compile(r"white lung|confluen|waterfall", re.I),
}
_YES = {"yes", "y", "true", "1"}
_NO = {"no", "n", "false", "0"}


@dataclass(frozen=True)
class LabelRow:
    sop_instance_uid: str
    score: int
    patient_id: str
    findings: dict[str, float]  # weak labels in {0, 1}; NaN where unknown


@dataclass
class LabelSet:
    rows: list[LabelRow]
    sha256: str  # of the CSV bytes: the manifest records which label set trained a package
    rejected: list[str] = field(default_factory=list)  # "line N: why"


def _flag(value: str | None) -> float:
    v = (value or "").strip().lower()
    return 1.0 if v in _YES else 0.0 if v in _NO else math.nan


def weak_findings(comments: str, a_lines: str | None = None, b_lines: str | None = None) -> dict[str, float]:
    """Finding labels from the expert's yes/no flags and comments.

    A comment naming a finding marks it present; an unremarkable comment cannot prove absence, so
    pattern findings are 0 only when the comment is non-empty and silent (experts write what they see).
    """
    out = {"a_lines": _flag(a_lines), "b_lines": _flag(b_lines)}
    text = comments or ""
    for name, pat in _PATTERNS.items():
        out[name] = 1.0 if pat.search(text) else (0.0 if text.strip() else math.nan)
    if math.isnan(out["b_lines"]) and re.search(r"b-?lines?", text, re.I):
        out["b_lines"] = 1.0
    return {k: out[k] for k in AUX_FINDINGS}


def read_labels(path: Path) -> LabelSet:
    """Rows of ``sop_instance_uid,score[,patient_id,a_lines,b_lines,comments]``; bad rows are listed."""
    raw = path.read_bytes()
    text = raw.decode("utf-8-sig")
    reader = csv.DictReader(text.splitlines())
    fields = {f.strip().lower() for f in reader.fieldnames or []}
    if not {"sop_instance_uid", "score"} <= fields:
        raise ValueError(f"{path.name}: needs columns sop_instance_uid and score, has {sorted(fields)}")
    rows, rejected, seen = [], [], set()
    for n, rec in enumerate(reader, start=2):
        rec = {(k or "").strip().lower(): (v or "").strip() for k, v in rec.items()}
        uid = rec.get("sop_instance_uid", "")
        try:
            score = int(float(rec.get("score", "")))
        except ValueError:
            rejected.append(f"line {n}: score {rec.get('score')!r} is not a number (not gradable?)")
            continue
        if not uid or score not in range(4):
            rejected.append(f"line {n}: needs a SOP Instance UID and a score 0-3")
            continue
        if uid in seen:
            rejected.append(f"line {n}: instance listed twice, first row kept")
            continue
        seen.add(uid)
        # Without a patient column every cine is its own group: patient-wise splits stay honest
        # only as far as the site's CSV allows, which the CV report says.
        patient = rec.get("patient_id") or f"instance:{uid}"
        rows.append(
            LabelRow(
                uid,
                score,
                patient,
                weak_findings(rec.get("comments", ""), rec.get("a_lines"), rec.get("b_lines")),
            )
        )
    return LabelSet(rows, hashlib.sha256(raw).hexdigest(), rejected)


def index_dicom(folder: Path) -> dict[str, Path]:
    """SOP Instance UID -> file, reading headers only (pixel data is not loaded)."""
    out: dict[str, Path] = {}
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid and uid not in out:
            out[uid] = f
    return out


@dataclass
class Cine:
    """One labelled cine in the working grid, ready for the score head."""

    label: LabelRow
    frames: np.ndarray  # (n, rows, cols) uint8 grid frames
    valid: np.ndarray  # (rows, cols) bool: grid cells inside the imaged sector
    frame_rate: float | None


def grid_cine(ds: pydicom.Dataset, shape: GridShape = GridShape()) -> tuple[np.ndarray, np.ndarray, Grid]:
    """Decode and unwarp a cine exactly as the pipeline does; also the sector's valid-cell mask."""
    frames = decode_frames(ds)
    grid = Grid(detect_sector(frames, ds), (frames.shape[1], frames.shape[2]), shape)
    return grid.to_grid(frames), grid.valid_mask(), grid


def load_cines(
    labels: LabelSet,
    files: dict[str, Path],
    shape: GridShape = GridShape(),
    progress: Callable[[], None] | None = None,
) -> tuple[list[Cine], list[str]]:
    """Grid frames of every labelled instance that has a file; the second list says what was skipped."""
    cines: list[Cine] = []
    skipped: list[str] = []
    for row in labels.rows:
        path = files.get(row.sop_instance_uid)
        if path is None:
            skipped.append(f"{row.sop_instance_uid}: no DICOM file with this SOP Instance UID")
        else:
            try:
                ds = pydicom.dcmread(path)
                frames, valid, _ = grid_cine(ds, shape)
                cines.append(Cine(row, frames, valid, frame_rate(ds)))
            except (InputError, InvalidDicomError, OSError, ValueError) as exc:
                skipped.append(f"{path.name}: unusable ({exc})")
        if progress is not None:
            progress()
    return cines, skipped


def patients(cines: Iterable[Cine]) -> np.ndarray:
    return np.array([c.label.patient_id for c in cines])
