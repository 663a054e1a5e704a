"""build_outputs returns each object with its kind."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage

from service.core.dicom import OUTPUT_SOP_CLASSES, OutputKind
from tests.factories import frames_rgb, make_analysis, make_source
from workers.write_dicom import Output, OutputOptions, build_outputs


def test_outputs_carry_their_kind() -> None:
    source = make_source(64, 64, 2, jpeg=False)
    analysis = make_analysis(source)
    outputs = build_outputs(
        source, analysis, frames_rgb=frames_rgb(2, 64, 64), options=OutputOptions(validate=False)
    )
    assert [o.kind for o in outputs] == [OutputKind.SEG, OutputKind.SR, OutputKind.SC]
    for o in outputs:
        assert o.dataset.SOPClassUID in OUTPUT_SOP_CLASSES[o.kind]


def test_output_kind_must_match_its_sop_class() -> None:
    ds = Dataset()
    ds.SOPClassUID = Comprehensive3DSRStorage
    assert Output(OutputKind.SR, ds).dataset is ds
    with pytest.raises(ValueError, match="SEG"):
        Output(OutputKind.SEG, ds)
    ds.SOPClassUID = SegmentationStorage
    with pytest.raises(ValueError):
        Output(OutputKind.SC, ds)
