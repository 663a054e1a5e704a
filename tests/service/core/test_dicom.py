"""SOP classes, C-STORE status categories and the ultrasound region, from service.core.dicom."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID

from service.core.dicom import (
    OUTPUT_SOP_CLASSES,
    US_SOP_CLASSES,
    OutputKind,
    permanent_failure,
    stored,
    ultrasound_region,
)


def test_us_sop_classes_are_the_four_ultrasound_image_classes() -> None:
    assert {UID(u).keyword for u in US_SOP_CLASSES} == {
        "UltrasoundImageStorage",
        "UltrasoundMultiFrameImageStorage",
        "UltrasoundImageStorageRetired",
        "UltrasoundMultiFrameImageStorageRetired",
    }
    assert "1.2.840.10008.5.1.4.1.1.3.1" in US_SOP_CLASSES  # plain strings match too


def test_every_output_kind_has_sop_classes() -> None:
    assert set(OUTPUT_SOP_CLASSES) == set(OutputKind)
    assert [k.value for k in OutputKind] == ["SEG", "SR", "SC"]  # part of every output UID


@pytest.mark.parametrize("code", [0x0000, 0xB000, 0xB006, 0xB007])
def test_success_and_storage_warnings_mean_stored(code: int) -> None:
    assert stored(code) and not permanent_failure(code)


@pytest.mark.parametrize(
    ("code", "permanent"),
    [(0x0122, True), (0xA900, True), (0xC000, True), (0xC211, True), (0xA700, False), (0x0110, False)],
)
def test_failures_are_not_stored(code: int, permanent: bool) -> None:
    assert not stored(code)
    assert permanent_failure(code) is permanent


def _region(box: tuple[int, int, int, int], *, cm: bool = True, data_type: int = 1, fmt: int = 1) -> Dataset:
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType = fmt, data_type
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = box
    r.PhysicalUnitsXDirection = r.PhysicalUnitsYDirection = 3 if cm else 0
    r.PhysicalDeltaX, r.PhysicalDeltaY = 0.02, 0.04
    return r


def _source(*regions: Dataset) -> Dataset:
    ds = Dataset()
    ds.SequenceOfUltrasoundRegions = list(regions)
    return ds


def test_region_prefers_calibrated_then_tissue_then_largest() -> None:
    small, large = (0, 0, 9, 9), (0, 0, 99, 99)
    chosen = ultrasound_region(_source(_region(small), _region(large)))
    assert chosen is not None and chosen.x1 == 99 and chosen.spacing_mm == pytest.approx((0.4, 0.2))
    chosen = ultrasound_region(_source(_region(small), _region(large, cm=False)))
    assert chosen is not None and chosen.x1 == 9  # only the calibrated one gives millimetres
    chosen = ultrasound_region(_source(_region(large, data_type=2), _region(small)))
    assert chosen is not None and chosen.x1 == 9  # tissue over colour flow
    chosen = ultrasound_region(_source(_region(large, cm=False)))
    assert chosen is not None and chosen.spacing_mm is None  # bounds without a scale


def test_no_usable_region() -> None:
    assert ultrasound_region(None) is None
    assert ultrasound_region(Dataset()) is None
    assert ultrasound_region(_source(_region((0, 0, 9, 9), fmt=3))) is None  # spectral, not 2D
    no_bounds = _region((0, 0, 9, 9))
    del no_bounds.RegionLocationMaxY1
    assert ultrasound_region(_source(no_bounds)) is None


def test_a_malformed_region_sequence_is_no_region() -> None:
    """Found by bench/chaos/fuzz.py: a wrong VR on the sequence (an int where items belong) or on a
    bound raised AttributeError/ValueError inside the worker, which retried a job that must fail."""
    not_a_sequence = Dataset()
    not_a_sequence.add_new(0x00186011, "US", 5)  # SequenceOfUltrasoundRegions read with a wrong VR
    assert ultrasound_region(not_a_sequence) is None
    text_bound = _region((0, 0, 9, 9))
    text_bound.add_new(0x00186018, "LO", "abc")  # RegionLocationMinX0 as text
    assert ultrasound_region(_source(text_bound, _region((0, 0, 4, 4)))).x1 == 4  # type: ignore[union-attr]
