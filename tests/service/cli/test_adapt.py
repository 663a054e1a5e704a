"""`lusai adapt` end to end on a small labelled set, and the adapted package through `lusai analyze`."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from service.cli.app import app
from service.core.model_package import DEFAULT_PACKAGE, load_package
from tests.factories import phantom_cine_file

runner = CliRunner()


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Eight phantom cines of four patients (half JPEG), labelled, plus a row whose file is missing."""
    root = tmp_path_factory.mktemp("site")
    dicom = root / "dicom"
    (dicom / "nested").mkdir(parents=True)
    rows = []
    for i in range(8):
        uid = f"1.2.826.0.1.3680043.8.498.99{i}"
        folder = dicom / "nested" if i % 3 == 0 else dicom
        phantom_cine_file(folder / f"c{i}.bin", frames=6, jpeg=i % 2 == 0, seed=i, sop_uid=uid)
        name = f"{folder.relative_to(dicom)}/c{i}.bin".removeprefix("./")
        rows.append([uid, str(i % 4), f"P{i // 2}", "yes" if i % 4 < 2 else "no", "", "B-lines", name])
    rows.append(["1.2.826.0.1.3680043.8.498.12345", "1", "P9", "", "", "", "gone.dcm"])  # no such file
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["sop_instance_uid", "score", "patient_id", "a_lines", "b_lines", "comments", "file"])
        w.writerows(rows)
    with open(dicom / "labels.csv", "w", newline="") as fh:  # `lusai eval` reads labels by file name
        w = csv.writer(fh)
        w.writerow(["file", "score"])
        w.writerows([r[6], r[1]] for r in rows[:-1])
    return dicom, labels


def _adapt(dicom: Path, labels: Path, out: Path, *extra: str) -> str:
    args = ["adapt", str(dicom), "--labels", str(labels), "--out", str(out), "--folds", "2",
            "--max-epochs", "2", "--seed", "3", "--device", "cpu", *extra]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.split())  # rich wraps long lines


@pytest.mark.slow
def test_adapt_writes_a_verified_package_deterministically(
    labelled: tuple[Path, Path], tmp_path: Path
) -> None:
    dicom, labels = labelled
    report = tmp_path / "cv.json"
    output = _adapt(dicom, labels, tmp_path / "pkg", "--report", str(report))
    assert "no DICOM file with this SOP Instance UID" in output  # the missing row is reported
    assert "patient-wise CV" in output and "pooled" in output

    pkg = load_package(tmp_path / "pkg")
    parent = load_package(DEFAULT_PACKAGE)
    assert pkg.parent is not None and pkg.parent["package_sha256"] == parent.package_sha256
    assert {"segmenter_torch", "scorer_torch", "scorer_onnx", "cv_report"} <= set(pkg.files)
    assert pkg.training["labels_sha256"] == hashlib.sha256(labels.read_bytes()).hexdigest()
    assert pkg.training["cines"] == 8 and pkg.training["patients"] == 4
    assert pkg.cv is not None and pkg.cv["pooled"]["n"] == 8
    assert set(pkg.cv["per_fold"]["kappa_quadratic"]) == {"mean", "sd", "min", "max"}
    cv = json.loads(report.read_text())
    assert len(cv["folds"]) == 2 and len(cv["predictions"]) == 8
    for fold in cv["folds"]:  # a patient is never in two folds
        uids = {p["sop_instance_uid"] for p in cv["predictions"] if p["fold"] == fold["fold"]}
        assert len(uids) == fold["videos"]
    card = (tmp_path / "pkg" / "MODEL_CARD.md").read_text()
    assert "Cross-validation" in card and parent.package_sha256 in card

    # Same seed, same data: the same weights (the package differs only by its creation time).
    _adapt(dicom, labels, tmp_path / "again")
    again = load_package(tmp_path / "again")
    assert again.sha256s["scorer_torch"] == pkg.sha256s["scorer_torch"]

    pkg_dir = str(tmp_path / "pkg")
    result = runner.invoke(app, ["analyze", str(dicom / "c1.bin"), "--model", pkg_dir, "--json"])
    assert result.exit_code == 0, result.output
    line = json.loads(result.output.strip().splitlines()[-1])
    assert line["score_method"] == "learned"
    assert len(line["score_probabilities"]) == 4
    assert line["model"]["package_sha256"] == pkg.package_sha256
    assert line["model"]["version"] == pkg.version and "+adapt." in pkg.version
    if line["gradable"]:
        assert line["score"] in range(4)
        assert len(line["frame_scores"]) == 6

    # `lusai eval --model` scores an adapted package with its head, counting a flag as 0.
    evaluation = tmp_path / "eval.json"
    args = [
        "eval",
        str(dicom),
        "--model",
        pkg_dir,
        "--phantom",
        "0",
        "--device",
        "cpu",
        "--out",
        str(evaluation),
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    ev = json.loads(evaluation.read_text())
    assert ev["video_agreement"]["n"] == 8 and len(ev["videos"]) == 8
    c1 = next(v for v in ev["videos"] if v["file"] == "c1.bin")
    assert c1["model"] == line["score"]


def test_adapt_refuses_too_little_data(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    dicom, _ = labelled
    few = tmp_path / "few.csv"
    few.write_text("sop_instance_uid,score,patient_id\n1.2.826.0.1.3680043.8.498.990,1,P0\n")
    result = runner.invoke(app, ["adapt", str(dicom), "--labels", str(few), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1
    assert "at least" in " ".join(result.output.split())
    assert not (tmp_path / "p").exists()


def test_adapt_bad_labels_file_is_a_clear_error(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    dicom, _ = labelled
    bad = tmp_path / "bad.csv"
    bad.write_text("file,severity\nx.dcm,2\n")
    result = runner.invoke(app, ["adapt", str(dicom), "--labels", str(bad), "--out", str(tmp_path / "p")])
    assert result.exit_code == 1 and "sop_instance_uid" in result.output
    result = runner.invoke(app, ["adapt", str(dicom), "--labels", str(bad), "--out", str(tmp_path / "q"),
                                 "--method", "magic"])  # fmt: skip
    assert result.exit_code == 1 and "finetune" in result.output
