"""The SEG parsed the way OHIF does (dcmjs, Node): tests/js/check_seg.js.

Skips without ``node`` or ``tests/js/node_modules`` (``npm ci`` in tests/js) unless
LUSAI_REQUIRE_EXTERNAL=1.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom

from service.core.segments import SEGMENT_CLASSES
from tests.workers.write_dicom.conftest import JS_DIR, outputs_for
from workers.domain import Analysis


def test_dcmjs_reads_seg(node: str, case: tuple[pydicom.Dataset, Analysis], tmp_path: Path) -> None:
    source, analysis = case
    seg = outputs_for(source, analysis)["SEG"]
    path = tmp_path / "seg.dcm"
    seg.save_as(path, enforce_file_format=True)
    proc = subprocess.run(
        [node, str(JS_DIR / "check_seg.js"), str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)

    assert summary["sopClassUID"] == pydicom.uid.SegmentationStorage
    assert (summary["rows"], summary["columns"]) == (source.Rows, source.Columns)
    assert summary["referencedSeriesInstanceUID"] == source.SeriesInstanceUID
    assert [s["number"] for s in summary["segments"]] == [int(c) for c in SEGMENT_CLASSES]
    assert {s["algorithmType"] for s in summary["segments"]} == {"AUTOMATIC"}
    assert summary["segments"][0]["typeCode"] == "3120008"
    assert all(len(s["color"]) == 3 for s in summary["segments"])

    present = [int(c) for c in SEGMENT_CLASSES if (analysis.labels == c).any()]
    n = analysis.labels.shape[0]
    expected = []
    for number in present:
        for f in range(n):
            mask = (analysis.labels[f] == number).ravel()
            if mask.any():  # a segment has frames only where it has pixels
                expected.append((number, source.SOPInstanceUID, f + 1, int(mask.sum()), int(np.argmax(mask))))
    assert summary["numberOfFrames"] == len(expected) < len(present) * n
    got = [
        (
            fr["segment"],
            fr["referencedSOPInstanceUID"],
            fr["referencedFrameNumber"],
            fr["foreground"],
            fr["firstForeground"],
        )
        for fr in summary["frames"]
    ]
    assert got == expected
