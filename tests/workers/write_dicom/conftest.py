"""Fixtures: synthetic US cines (raw MONOCHROME2 and JPEG Baseline YBR_FULL_422) with analyses."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace

import pydicom
import pytest

from tests.workers.write_dicom.sources import frames_rgb, make_analysis, make_source
from workers.domain import Analysis
from workers.write_dicom import OutputOptions, build_outputs
from workers.write_dicom.validate import find_tool

NOW = dt.datetime(2026, 1, 2, 3, 4, 5)
N_FRAMES = 4

#: (rows, cols, jpeg): BLUS-sized 350 x 350 (122500 px, not a multiple of 8) and 600 x 800.
SOURCE_KINDS = [(350, 350, False), (600, 800, True), (350, 350, True), (600, 800, False)]


def require_external(what: str, available: bool) -> None:
    """Skip when an external tool is missing, unless LUSAI_REQUIRE_EXTERNAL=1 makes it a failure."""
    if available:
        return
    if os.environ.get("LUSAI_REQUIRE_EXTERNAL") == "1":
        pytest.fail(f"{what} is required (LUSAI_REQUIRE_EXTERNAL=1) but missing")
    pytest.skip(f"{what} not available")


@pytest.fixture
def dicom3tools() -> None:
    require_external("dicom3tools (dciodvfy, dcentvfy)", bool(find_tool("dciodvfy") and find_tool("dcentvfy")))


@pytest.fixture(params=SOURCE_KINDS, ids=lambda p: f"{p[0]}x{p[1]}-{'jpeg' if p[2] else 'raw'}")
def case(request: pytest.FixtureRequest) -> tuple[pydicom.Dataset, Analysis]:
    rows, cols, jpeg = request.param
    source = make_source(rows, cols, N_FRAMES, jpeg=jpeg)
    return source, make_analysis(source)


def outputs_for(
    source: pydicom.Dataset, analysis: Analysis, options: OutputOptions | None = None, *, validate: bool = False
) -> dict[str, pydicom.Dataset]:
    """Build without validation (tests validate explicitly) and key the objects by Modality."""
    opts = replace(options or OutputOptions(), validate=validate)
    n, rows, cols = analysis.labels.shape
    rgb = frames_rgb(n, rows, cols, seed=1)
    return {ds.Modality: ds for ds in build_outputs(source, analysis, frames_rgb=rgb, options=opts, now=NOW)}
