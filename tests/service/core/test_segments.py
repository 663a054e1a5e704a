"""The one segment table read by the SEG, SR, overlay SC and previews."""

from __future__ import annotations

import pytest

from service.core.segments import PRIVATE_SCHEME, SEGMENT_CLASSES, SEGMENTS, SegmentClass, segment


def test_every_class_but_background_is_a_segment_in_number_order() -> None:
    assert tuple(c for c in SegmentClass if c != SegmentClass.BACKGROUND) == SEGMENT_CLASSES
    assert [s.number for s in SEGMENTS] == list(range(1, len(SegmentClass)))


def test_lookup_by_class_or_label_value() -> None:
    assert segment(SegmentClass.B_LINE) is segment(3)
    assert segment(3).name == "b_line"
    with pytest.raises(KeyError):
        segment(SegmentClass.BACKGROUND)
    with pytest.raises(KeyError):
        segment(99)


def test_rows_are_distinct_and_coded() -> None:
    assert len({s.label for s in SEGMENTS}) == len(SEGMENTS)
    assert len({s.rgb for s in SEGMENTS}) == len(SEGMENTS)
    assert len({(s.type.value, s.type.scheme_designator) for s in SEGMENTS}) == len(SEGMENTS)
    for s in SEGMENTS:
        assert all(0 <= v <= 255 for v in s.rgb)
        assert s.category.scheme_designator in {"SCT", PRIVATE_SCHEME}
        assert s.type.scheme_designator in {"SCT", PRIVATE_SCHEME}


def test_seg_codes_and_colours_are_kept() -> None:
    """What PACS already received: changing a row changes every future SEG."""
    assert [(s.type.value, s.rgb) for s in SEGMENTS] == [
        ("3120008", (255, 215, 0)),
        ("ALINE", (0, 180, 255)),
        ("BLINE", (255, 40, 40)),
        ("95436008", (200, 0, 255)),
        ("60046008", (0, 220, 90)),
        ("113197003", (140, 140, 140)),
    ]
