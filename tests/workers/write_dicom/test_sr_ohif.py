"""The SR as OHIF 3.13.2 loads it (tests/js/check_sr.js, Node + dcmjs), and both SR shapes through
dicom3tools.

check_sr.js models OHIF's SR display code (not part of dcmjs) with its unguarded reads, so the
``full`` shape - measurement groups without coordinates - throws there as it crashes OHIF (issue
14), and the default ``viewer`` shape loads one measurement: the key-frame region, with the score
as its first line of text. It also runs dcmjs's own TID 1500 reader
(adapters.Cornerstone3D.MeasurementReport.generateToolState). Skips without ``node`` or
``tests/js/node_modules`` (``npm ci`` in tests/js) unless LUSAI_REQUIRE_EXTERNAL=1, like
test_js_dcmjs.py; the dicom3tools test skips without them likewise.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset

from service.core.segments import SegmentClass
from tests.factories import make_analysis, make_source
from tests.workers.write_dicom.conftest import JS_DIR, outputs_for
from tests.workers.write_dicom.test_sr import sr_with_shape
from workers.domain import Analysis
from workers.write_dicom.sr import SR_SHAPES
from workers.write_dicom.validate import validate_outputs


def _not_gradable(analysis: Analysis) -> Analysis:
    f = dataclasses.replace(analysis.findings, gradable=False, ungradable_reason="no-contact")
    return dataclasses.replace(analysis, findings=f)


def ohif_load(node: str, source: Dataset, sr: Dataset, tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    proc = subprocess.run(
        [node, str(JS_DIR / "check_sr.js"), str(path), source.SOPInstanceUID, str(source.NumberOfFrames)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout))


@pytest.mark.parametrize(
    ("score", "gradable", "text"),
    [
        (2, True, ["LUS score 2: ", "Lung ultrasound score: 2.00 {score}"]),
        (0, True, ["LUS score 0: ", "Lung ultrasound score:  {score}"]),  # OHIF prints a 0 as nothing
        (
            2,
            False,
            ["LUS not gradable: No tissue echoes (no probe contact): ", "Number of Frames: 4.00 {frames}"],
        ),
    ],
    ids=["score-2", "score-0", "not-gradable"],
)
def test_ohif_shows_the_key_frame_region_with_the_result(
    node: str, tmp_path: Path, score: int, gradable: bool, text: list[str]
) -> None:
    source = make_source(350, 350, 4, jpeg=True)
    analysis = make_analysis(source, key_frame=2, score=score)
    analysis = analysis if gradable else _not_gradable(analysis)
    _check_loads(node, source, analysis, tmp_path, text)


def test_ohif_says_when_the_region_is_not_the_pleura(node: str, tmp_path: Path) -> None:
    source = make_source(350, 350, 4, jpeg=True)
    analysis = make_analysis(source, key_frame=2)
    labels = analysis.labels.copy()
    labels[2][labels[2] == SegmentClass.PLEURAL_LINE] = 0
    text = [
        "LUS score 2: ",
        "Region: B-lines (no pleural line on this frame): ",
        "Lung ultrasound score: 2.00 {score}",
    ]
    _check_loads(node, source, dataclasses.replace(analysis, labels=labels), tmp_path, text)


def _check_loads(node: str, source: Dataset, analysis: Analysis, tmp_path: Path, text: list[str]) -> None:
    out = outputs_for(source, analysis)  # the default shape, with a BINARY SEG referenced
    summary = ohif_load(node, source, out["SR"], tmp_path)

    assert summary["crash"] is None
    (measurement,) = summary["measurements"]  # one per measurement group, each loaded
    assert measurement["loaded"] and measurement["imageKey"] == f"{source.SOPInstanceUID}:3"
    assert measurement["path"] == "non-geometric" and measurement["graphicTypes"] == ["POLYLINE"]
    (points,) = measurement["points"]
    assert points[:2] == points[-2:] and len(points) >= 10  # closed polygon of (column, row) pairs
    assert measurement["text"] == text
    assert summary["rehydratable"] is False  # OHIF offers no conversion into an editable tool
    assert summary["dcmjs"] == {"toolMeasurements": 0}  # dcmjs reads it without error; no tool groups


def test_the_full_shape_is_what_crashes_ohif(node: str, tmp_path: Path) -> None:
    """Issue 14, reproduced: the measurement groups without a coordinate."""
    source = make_source(350, 350, 4, jpeg=True)
    analysis = make_analysis(source, key_frame=2)
    out = outputs_for(source, analysis)
    summary = ohif_load(node, source, sr_with_shape(source, analysis, out["SEG"], "full"), tmp_path)
    assert (
        summary["crash"] == "TypeError: Cannot read properties of undefined (reading 'ReferencedSOPSequence')"
    )
    assert [m["graphicTypes"] for m in summary["measurements"]][1:] == [[]] * (
        len(summary["measurements"]) - 1
    )
    assert summary["dcmjs"] == {"toolMeasurements": 0}


@pytest.mark.usefixtures("dicom3tools")
@pytest.mark.parametrize("shape", SR_SHAPES)
@pytest.mark.parametrize("gradable", [True, False], ids=["gradable", "not-gradable"])
def test_both_shapes_pass_dciodvfy(shape: str, gradable: bool) -> None:
    source = make_source(350, 350, 3, jpeg=False)
    analysis = make_analysis(source, with_effusion=True)
    analysis = analysis if gradable else _not_gradable(analysis)
    out = outputs_for(source, analysis)
    sr = sr_with_shape(source, analysis, out["SEG"], shape)
    results = validate_outputs(source, [out["SEG"], sr])  # raises on any error
    assert {r.check for r in results} == {"conformance", "dciodvfy", "dcentvfy"}
