"""`lusai analyze --json`: one JSON line per input, errors as JSON with a non-zero exit code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from service.cli.app import app
from workers.preprocess.wrap import frames_to_dataset
from workers.training.phantom import make_cine


def _write(path: Path, seed: int) -> str:
    c = make_cine(np.random.default_rng(seed), n_frames=4, src=(200, 220), scenario="b_lines")
    ds = frames_to_dataset(c.frames, mm_per_pixel=c.sector.mm_per_pixel)
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def test_analyze_json_folder(tmp_path: Path) -> None:
    uids = {_write(tmp_path / "a.dcm", 1), _write(tmp_path / "b.dcm", 2)}
    res = CliRunner().invoke(app, ["analyze", str(tmp_path), "--json", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert {x["sop_instance_uid"] for x in lines} == uids
    for x in lines:
        assert x["frames"] == 4 and x["score"] in range(4) and len(x["frame_scores"]) == 4
        assert {"b_line_fraction", "b_line_count", "consolidation", "effusion", "timings_ms"} <= set(x)
        assert set(x["model"]) == {"name", "version", "weights_sha256", "package_sha256"}


def test_analyze_failure_exit_code(tmp_path: Path) -> None:
    _write(tmp_path / "ok.dcm", 3)
    (tmp_path / "bad.dcm").write_bytes(b"garbage")
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "ok.dcm"), str(tmp_path / "bad.dcm"), "--json"])
    assert res.exit_code == 1
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.strip()]
    assert len(lines) == 2
    err = next(x for x in lines if "error" in x)
    assert err["path"].endswith("bad.dcm") and err["error"]


def test_analyze_table_output(tmp_path: Path) -> None:
    _write(tmp_path / "a.dcm", 4)
    res = CliRunner().invoke(app, ["analyze", str(tmp_path / "a.dcm"), "--device", "cpu"])
    assert res.exit_code == 0 and "a.dcm" in res.stdout
