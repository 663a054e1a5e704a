"""dciodvfy / dcentvfy / in-process conformance validation of every output type."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from service.core.dicom import OutputKind
from tests.factories import frames_rgb, make_analysis, make_source
from tests.workers.write_dicom.conftest import outputs_for
from workers.domain import Analysis
from workers.write_dicom import (
    OutputOptions,
    OutputValidationError,
    OverlayOptions,
    SegOptions,
    build_outputs,
)
from workers.write_dicom.validate import parse_dicom3tools, validate_outputs

DCIODVFY_SAMPLE = """Segmentation
Error - Missing attribute Type 1 Required Element=<SegmentLabel> Module=<SegmentationImage>
Warning - </SegmentSequence(0062,0002)[2]/X(0008,0102)[1]> - Unrecognized defined term = <99LUSAI>
Warning - Attribute is not present in standard DICOM IOD - (0x0020,0x0060) CS Laterality
Abort - File open for read failed
"""


def test_parse_dicom3tools_sorts_lines() -> None:
    result = parse_dicom3tools(DCIODVFY_SAMPLE, "dciodvfy", "SEG")
    assert len(result.errors) == 2 and not result.ok
    assert len(result.private_code_warnings) == 1 and len(result.warnings) == 1
    assert parse_dicom3tools("Segmentation\n", "dciodvfy", "SEG").ok


@pytest.mark.usefixtures("dicom3tools")
def test_every_output_type_validates(case: tuple[pydicom.Dataset, Analysis]) -> None:
    source, analysis = case
    outputs = list(outputs_for(source, analysis).values())
    results = validate_outputs(source, outputs)
    checked = {(r.check, r.subject) for r in results}
    for subject in (
        "SegmentationStorage",
        "Comprehensive3DSRStorage",
        "MultiFrameTrueColorSecondaryCaptureImageStorage",
    ):
        assert ("dciodvfy", subject) in checked and ("conformance", subject) in checked
    assert ("dcentvfy", "entities") in checked
    assert all(r.ok for r in results)
    assert any(r.private_code_warnings for r in results)  # 99LUSAI is used and only warned about


@pytest.mark.usefixtures("dicom3tools")
def test_options_validate() -> None:
    source = make_source(350, 350, 3, jpeg=True)
    analysis = make_analysis(source, with_effusion=True)
    options = OutputOptions(
        seg=SegOptions(segmentation_type="LABELMAP", compress=True), overlay=OverlayOptions(jpeg_quality=85)
    )
    outputs = build_outputs(source, analysis, frames_rgb=frames_rgb(3, 350, 350), options=options)
    assert [(o.kind, o.dataset.Modality) for o in outputs] == [
        (OutputKind.SEG, "SEG"),
        (OutputKind.SR, "SR"),
        (OutputKind.SC, "OT"),
    ]
    results = validate_outputs(source, [o.dataset for o in outputs])
    assert ("dciodvfy", "LabelMapSegmentationStorage") in {(r.check, r.subject) for r in results}


@pytest.mark.usefixtures("dicom3tools")
def test_build_outputs_validates_by_default() -> None:
    source = make_source(350, 350, 2, jpeg=False)
    analysis = make_analysis(source)
    outputs = build_outputs(source, analysis)  # no frames: no overlay
    assert [(o.kind, o.dataset.Modality) for o in outputs] == [(OutputKind.SEG, "SEG"), (OutputKind.SR, "SR")]


@pytest.mark.usefixtures("dicom3tools")
def test_broken_iod_fails_dciodvfy() -> None:
    source = make_source(64, 64, 2, jpeg=False)
    out = outputs_for(source, make_analysis(source))
    del out["SEG"].SegmentSequence[0].SegmentLabel
    with pytest.raises(OutputValidationError) as info:
        validate_outputs(source, [out["SEG"]])
    failed = {r.check: r for r in info.value.results if not r.ok}
    assert set(failed) == {"dciodvfy", "conformance"}  # the in-process check refuses it too
    assert failed["dciodvfy"].subject == "SegmentationStorage"
    assert any("SegmentLabel" in e for e in failed["dciodvfy"].errors)


@pytest.mark.usefixtures("dicom3tools")
def test_inconsistent_patient_fails_dcentvfy() -> None:
    source = make_source(64, 64, 2, jpeg=False)
    out = outputs_for(source, make_analysis(source))
    out["SR"].PatientBirthDate = "19800101"
    with pytest.raises(OutputValidationError) as info:
        validate_outputs(source, [out["SEG"], out["SR"]])
    failed = [r for r in info.value.results if not r.ok]
    assert [r.check for r in failed] == ["conformance", "dcentvfy"]  # the SR's, and the entities
    assert any("PatientBirthDate" in e for e in failed[0].errors)


def test_validator_output_that_is_not_utf8_is_read() -> None:
    """Found by bench/chaos/fuzz.py: dciodvfy quotes a source's non-UTF-8 bytes, and decoding them
    raised UnicodeDecodeError, so the job was retried instead of its outputs being judged."""
    from workers.write_dicom.validate import _run

    assert _run(["printf", "Error - \\255"]) == "Error - \ufffd"


@pytest.mark.usefixtures("dicom3tools")
def test_a_deflated_seg_is_checked_by_every_validator(tmp_path: Path) -> None:
    """dicom3tools cannot read Deflated Explicit VR Little Endian: they get the same dataset,
    inflated to a file chunk by chunk; the in-process check reads the deflated bytes."""
    from workers.write_dicom.build import SEG_ENCODINGS
    from workers.write_dicom.validate import encode, write_inflated

    source = make_source(120, 160, 8, jpeg=False)
    options = OutputOptions(seg=SEG_ENCODINGS["binary-deflated"], sr=False, validate=False)
    seg = build_outputs(source, make_analysis(source), options=options)[0].dataset
    data = encode(seg)
    results = validate_outputs(source, [seg], encoded=[data])
    assert {r.check for r in results} == {"conformance", "dciodvfy", "dcentvfy"} and all(
        r.ok for r in results
    )
    write_inflated(tmp_path / "plain.dcm", data)
    plain = pydicom.dcmread(tmp_path / "plain.dcm")
    assert plain.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert plain == pydicom.dcmread(io.BytesIO(data))
