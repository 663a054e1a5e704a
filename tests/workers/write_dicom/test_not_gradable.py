"""A cine that is not gradable: SR without a score but with the coded reason, SEG still written,
overlay without a number; all validated with dciodvfy and read back."""

from __future__ import annotations

import dataclasses

import highdicom as hd
import pytest
from pydicom.dataset import Dataset

from tests.factories import make_analysis, make_source
from tests.workers.write_dicom.conftest import NOW, outputs_for
from workers.domain import Analysis
from workers.write_dicom import codes as c
from workers.write_dicom.common import SeriesInfo
from workers.write_dicom.overlay import legend_title
from workers.write_dicom.sr import build_sr
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
    source, analysis, out = built
    sr = hd.sr.Comprehensive3DSR.from_dataset(out["SR"])
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    pairs = _codes(sr)
    assert c.LUS_SCORE.value not in {name for name, _ in pairs}
    assert c.FRAME_LUS_SCORE.value not in {name for name, _ in pairs}
    assert c.B_LINE_PLEURA_PERCENT.value not in {name for name, _ in pairs}
    # The key-frame group (what OHIF shows) and the report's Qualitative Evaluations both say
    # "unusable" and why.
    assert pairs.count((c.QUALITY_ASSESSMENT.value, c.UNUSABLE.value)) == 2
    assert pairs.count((c.QUALITY_FINDING.value, "NOPLEURA")) == 2
    (key,) = report.get_image_measurement_groups()
    assert key.finding_type is not None and key.finding_type.value == c.LUS_KEY_FRAME.value
    # Its region hangs from the Number of Frames analysed (OHIF draws a region only from a NUM's
    # SCOORD or the group's own), and the Comment OHIF prints states the reason.
    (num,) = key.get_measurements()
    assert num.name == c.NUMBER_OF_FRAMES and num.value == analysis.frames == 5
    assert len(num.referenced_coordinates) == 1
    comments = [i.value for i in key[0].ContentSequence if i.name == c.COMMENT]
    assert comments == ["LUS not gradable: Pleural line not visible"]
    evaluations = {
        (e.name.value, e.value.value, e.value.scheme_designator) for e in key.get_qualitative_evaluations()
    }
    assert evaluations == {
        ("111050", "111235", "DCM"),
        ("111052", "NOPLEURA", "99LUSAI"),
        (c.KEY_FRAME_REGION.value, "3120008", "SCT"),
    }
    # The segments are still referenced, and the SEG still written.
    assert out["SEG"].SegmentationType == "BINARY"
    assert pairs.count((c.SEGMENTED.value, "3120008")) == 1
    full = build_sr(
        source,
        analysis,
        SeriesInfo("1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.2", 9102, "LUSAI SR"),
        seg=out["SEG"],
        uid_root="1.2.826.0.1.3680043.8.498.",
        now=NOW,
        shape="full",
    )
    full_report = hd.sr.Comprehensive3DSR.from_dataset(full).content
    assert len(full_report.get_volumetric_roi_measurement_groups()) > 0
    assert _codes(full).count((c.QUALITY_FINDING.value, "NOPLEURA")) == 2
    assert c.LUS_SCORE.value not in {name for name, _ in _codes(full)}


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
