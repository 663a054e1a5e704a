"""A cine that is not gradable: SR without a score but with the coded reason, SEG still written,
overlay without a number; all validated with dciodvfy and read back."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import pytest
from pydicom.dataset import Dataset

from tests.factories import make_analysis, make_source
from tests.workers.write_dicom.conftest import outputs_for
from workers.domain import Analysis
from workers.write_dicom import codes as c
from workers.write_dicom.overlay import legend_title
from workers.write_dicom.validate import validate_outputs


def _not_gradable(analysis: Analysis, reason: str = "no-pleura") -> Analysis:
    f = dataclasses.replace(
        analysis.findings, gradable=False, ungradable_reason=reason, ungradable_detail="measured values"
    )
    return dataclasses.replace(analysis, findings=f)


def _codes(ds: Dataset) -> list[tuple[str, str]]:
    """(concept name, value) code pairs of every content item, depth first."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "ConceptNameCodeSequence" in item:
            value = item.ConceptCodeSequence[0].CodeValue if "ConceptCodeSequence" in item else ""
            out.append((str(item.ConceptNameCodeSequence[0].CodeValue), str(value)))
        out += _codes(item)
    return out


@pytest.fixture(scope="module")
def built() -> tuple[Dataset, Analysis, dict[str, Dataset]]:
    source = make_source(350, 350, 5, jpeg=True)
    analysis = _not_gradable(make_analysis(source, key_frame=3, score=2))
    return source, analysis, outputs_for(source, analysis)


def test_sr_has_no_score_but_the_coded_reason(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    _, _, out = built
    sr = hd.sr.Comprehensive3DSR.from_dataset(out["SR"])
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    pairs = _codes(sr)
    assert c.LUS_SCORE.value not in {name for name, _ in pairs}
    assert c.FRAME_LUS_SCORE.value not in {name for name, _ in pairs}
    assert c.B_LINE_PLEURA_PERCENT.value not in {name for name, _ in pairs}
    # The key-frame ROI (what OHIF shows) and the cine group both say "unusable" and why.
    assert pairs.count((c.QUALITY_ASSESSMENT.value, c.UNUSABLE.value)) == 2
    assert pairs.count((c.QUALITY_FINDING.value, "NOPLEURA")) == 2
    (key,) = report.get_planar_roi_measurement_groups()
    assert key.get_measurements() == []
    evaluations = {
        (e.name.value, e.value.value, e.value.scheme_designator) for e in key.get_qualitative_evaluations()
    }
    assert evaluations == {("111050", "111235", "DCM"), ("111052", "NOPLEURA", "99LUSAI")}
    # Segment groups still reference the SEG, which is still written.
    assert out["SEG"].SegmentationType == "BINARY" and len(report.get_volumetric_roi_measurement_groups()) > 0


def test_every_reason_has_a_private_code() -> None:
    from workers.score.gradability import REASONS

    assert set(c.NOT_GRADABLE_REASONS) == set(REASONS)
    assert all(code.scheme_designator == "99LUSAI" for code in c.NOT_GRADABLE_REASONS.values())
    assert len({code.value for code in c.NOT_GRADABLE_REASONS.values()}) == len(REASONS)


def test_overlay_legend_has_no_number(built: tuple[Dataset, Analysis, dict[str, Dataset]]) -> None:
    source, analysis, out = built
    assert legend_title(analysis).startswith("LUS not gradable (no-pleura) (key frame 4)")
    assert "score" not in legend_title(analysis)
    assert legend_title(make_analysis(source, key_frame=3, score=2)).startswith("LUS score 2 ")
    assert out["OT"].NumberOfFrames == 5


@pytest.mark.usefixtures("dicom3tools")
@pytest.mark.parametrize("reason", ["no-contact", "rib-shadow"])
def test_not_gradable_outputs_validate(reason: str) -> None:
    source = make_source(240, 320, 3, jpeg=False)
    analysis = _not_gradable(make_analysis(source), reason)
    outputs = list(outputs_for(source, analysis).values())
    results = validate_outputs(source, outputs)
    checked = {(r.check, r.subject) for r in results}
    assert ("dciodvfy", "Comprehensive3DSRStorage") in checked and (
        "conformance",
        "Comprehensive3DSRStorage",
    ) in checked
    assert ("dciodvfy", "SegmentationStorage") in checked
    assert all(r.ok for r in results), [r for r in results if not r.ok]
    (sr,) = [ds for ds in outputs if ds.Modality == "SR"]
    assert (c.QUALITY_FINDING.value, c.NOT_GRADABLE_REASONS[reason].value) in _codes(sr)
