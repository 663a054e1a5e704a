"""`lusai eval`: phantom Dice plus agreement with a labels.csv folder as blus_to_dicom.py writes it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from service.cli.app import app
from workers.preprocess.wrap import frames_to_dataset
from workers.training.phantom import make_cine


def test_eval_reports_dice_and_agreement(tmp_path: Path) -> None:
    rows = []
    for i, (scenario, score) in enumerate([("normal", 0), ("white_lung", 3)]):
        c = make_cine(np.random.default_rng(i), n_frames=3, src=(200, 220), scenario=scenario)
        ds = frames_to_dataset(c.frames, mm_per_pixel=c.sector.mm_per_pixel)
        ds.save_as(tmp_path / f"patient_{i}_L1.dcm", enforce_file_format=True)
        rows.append({"file": f"patient_{i}_L1.dcm", "sop_instance_uid": ds.SOPInstanceUID, "score": score})
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "report.json"
    res = CliRunner().invoke(
        app, ["eval", str(tmp_path), "--phantom", "4", "--device", "cpu", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(out.read_text())
    assert set(report["phantom_dice"]) >= {"pleural_line", "b_line"}
    agree = report["video_agreement"]
    assert agree["n"] == 2 and 0.0 <= agree["exact"] <= 1.0
    assert [v["expert"] for v in report["videos"]] == [0, 3]
