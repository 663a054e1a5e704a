"""Fixtures of the DICOM writer tests: every source kind with its analysis, dicom3tools, and
:func:`outputs_for`, the build the tests inspect. Sources and analyses come from
:mod:`tests.factories`."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.conftest import REPO, missing, which
from tests.factories import frames_rgb, make_analysis, make_source
from workers.domain import Analysis
from workers.write_dicom import OutputOptions, build_outputs

NOW = dt.datetime(2026, 1, 2, 3, 4, 5)
N_FRAMES = 4

#: (rows, cols, jpeg): BLUS-sized 350 x 350 (122500 px, not a multiple of 8) and 600 x 800.
SOURCE_KINDS = [(350, 350, False), (600, 800, True), (350, 350, True), (600, 800, False)]


def outputs_for(
    source: Dataset,
    analysis: Analysis,
    options: OutputOptions | None = None,
    *,
    validate: bool = False,
) -> dict[str, Dataset]:
    """Build without validation (tests validate explicitly) and key the objects by Modality."""
    opts = replace(options or OutputOptions(), validate=validate)
    n, rows, cols = analysis.labels.shape
    rgb = frames_rgb(n, rows, cols, seed=1)
    outputs = build_outputs(source, analysis, frames_rgb=rgb, options=opts, now=NOW)
    return {o.dataset.Modality: o.dataset for o in outputs}


@pytest.fixture(params=SOURCE_KINDS, ids=lambda p: f"{p[0]}x{p[1]}-{'jpeg' if p[2] else 'raw'}")
def case(request: pytest.FixtureRequest) -> tuple[pydicom.Dataset, Analysis]:
    rows, cols, jpeg = request.param
    source = make_source(rows, cols, N_FRAMES, jpeg=jpeg)
    return source, make_analysis(source)


JS_DIR = REPO / "tests" / "js"


@pytest.fixture
def node() -> str:
    """Node.js with tests/js's packages (dcmjs): the readers OHIF uses."""
    exe = which("node")
    if not (JS_DIR / "node_modules" / "dcmjs").is_dir():
        missing("tests/js/node_modules (run `npm ci` in tests/js)")
    return exe
