"""Scoring (preprocessing) and the SEG take millimetres from the same ultrasound region."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from service.core.dicom import ultrasound_region
from tests.factories import frames_rgb, make_analysis, make_source
from tests.workers.write_dicom.conftest import outputs_for
from workers.preprocess import detect_sector


def _inset() -> Dataset:
    """A small calibrated 2D region listed first, at another scale (a zoom box on some scanners)."""
    r = Dataset()
    r.RegionSpatialFormat = 1
    r.RegionDataType = 1
    r.RegionFlags = 0
    r.RegionLocationMinX0, r.RegionLocationMinY0 = 2, 2
    r.RegionLocationMaxX1, r.RegionLocationMaxY1 = 30, 30
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3
    r.PhysicalDeltaX = r.PhysicalDeltaY = 0.08
    return r


def test_first_region_is_not_the_largest_and_both_agree() -> None:
    source = make_source(120, 160, 3, jpeg=False)
    sector_region = source.SequenceOfUltrasoundRegions[0]  # 0.03 x 0.025 cm, most of the image
    source.SequenceOfUltrasoundRegions = [_inset(), sector_region]
    region = ultrasound_region(source)
    assert region is not None and region.x0 == sector_region.RegionLocationMinX0

    seg = outputs_for(source, make_analysis(source))["SEG"]
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    seg_spacing = [float(v) for v in measures.PixelSpacing]
    sector = detect_sector(frames_rgb(3, 120, 160)[..., 0], source)

    assert seg_spacing == pytest.approx([0.3, 0.25])  # the sector region's, not the inset's 0.8
    assert sector.mm_per_pixel == pytest.approx(seg_spacing[1])
    assert sector.x0 >= sector_region.RegionLocationMinX0  # searched inside the same region
    assert sector.x1 <= sector_region.RegionLocationMaxX1
