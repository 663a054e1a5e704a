"""The in-process conformance check against dicom3tools, on deliberately broken SEGs and SRs.

The worker stores and sends an output once the in-process check passes (dicom3tools audit it
afterwards by default), so every class of error dciodvfy/dcentvfy report on what lusai writes must
be refused by the in-process check too: each mutation below is refused by both.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
from pydicom import config
from pydicom.dataset import Dataset

from tests.factories import make_analysis, make_source
from workers.write_dicom.build import SEG_ENCODINGS, OutputOptions, build_outputs
from workers.write_dicom.conformance import check_output
from workers.write_dicom.validate import OutputValidationError, encode, validate_outputs


def _first(ds: Dataset, value_type: str) -> Dataset:
    todo = list(ds.ContentSequence)
    while todo:
        item = todo.pop(0)
        if item.get("ValueType") == value_type:
            return item
        todo.extend(item.get("ContentSequence", []))
    raise LookupError(value_type)


MUTATIONS: dict[str, tuple[str, Callable[[Dataset], None]]] = {
    "SEG without SegmentSequence": ("SEG", lambda d: delattr(d, "SegmentSequence")),
    "SEG whose frame count lies": ("SEG", lambda d: setattr(d, "NumberOfFrames", int(d.NumberOfFrames) + 1)),
    "SEG of another patient": ("SEG", lambda d: setattr(d, "PatientID", "SOMEONE-ELSE")),
    "SEG with a bad date": ("SEG", lambda d: setattr(d, "ContentDate", "2026-01-01")),
    "SEG with a bad UID": ("SEG", lambda d: setattr(d, "SeriesInstanceUID", "1.2.abc")),
    "SEG of an unknown type": ("SEG", lambda d: setattr(d, "SegmentationType", "FRACTIONALX")),
    "SEG without ContentLabel": ("SEG", lambda d: delattr(d, "ContentLabel")),
    "SEG frame of no segment": (
        "SEG",
        lambda d: delattr(d.PerFrameFunctionalGroupsSequence[0], "SegmentIdentificationSequence"),
    ),
    "SEG with short pixel data": ("SEG", lambda d: setattr(d, "PixelData", d.PixelData[:-10])),
    "SEG without Rows": ("SEG", lambda d: delattr(d, "Rows")),
    "SEG with 8-bit binary frames": ("SEG", lambda d: setattr(d, "BitsAllocated", 8)),
    "SEG segment without label": ("SEG", lambda d: delattr(d.SegmentSequence[0], "SegmentLabel")),
    "SR without CompletionFlag": ("SR", lambda d: delattr(d, "CompletionFlag")),
    "SR with a bad VerificationFlag": ("SR", lambda d: setattr(d, "VerificationFlag", "MAYBE")),
    "SR NUM without units": (
        "SR",
        lambda d: delattr(_first(d, "NUM").MeasuredValueSequence[0], "MeasurementUnitsCodeSequence"),
    ),
    "SR item of an unknown value type": ("SR", lambda d: setattr(_first(d, "NUM"), "ValueType", "NUMX")),
    "SR without evidence": ("SR", lambda d: delattr(d, "CurrentRequestedProcedureEvidenceSequence")),
    "SR code without meaning": (
        "SR",
        lambda d: delattr(_first(d, "CODE").ConceptCodeSequence[0], "CodeMeaning"),
    ),
    "SR with a bad time": ("SR", lambda d: setattr(d, "ContentTime", "25:99")),
    "SR item without relationship": ("SR", lambda d: delattr(_first(d, "NUM"), "RelationshipType")),
}


@pytest.fixture(scope="module")
def built() -> tuple[Dataset, dict[str, Dataset]]:
    source = make_source(30, 40, 4, jpeg=True)
    options = OutputOptions(seg=SEG_ENCODINGS["binary"], overlay=None, validate=False)
    outputs = build_outputs(source, make_analysis(source), options=options)
    return source, {o.kind.value: o.dataset for o in outputs}


def test_what_lusai_writes_passes_both(built: tuple[Dataset, dict[str, Dataset]]) -> None:
    source, outputs = built
    for ds in outputs.values():
        assert check_output(source, encode(ds)) == []


@pytest.mark.usefixtures("dicom3tools")
@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_broken_output_is_refused_by_dicom3tools_and_by_the_in_process_check(
    built: tuple[Dataset, dict[str, Dataset]], name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    source, outputs = built
    kind, mutate = MUTATIONS[name]
    broken = {k: copy.deepcopy(v) for k, v in outputs.items()}
    mutate(broken[kind])
    monkeypatch.setattr(config.settings, "writing_validation_mode", config.IGNORE)  # let it be written
    files = [encode(broken["SEG"]), encode(broken["SR"])]
    with pytest.raises(OutputValidationError) as info:
        validate_outputs(source, [broken["SEG"], broken["SR"]], encoded=files)
    failed = {r.check for r in info.value.results if not r.ok}
    assert failed & {"dciodvfy", "dcentvfy"}, "dicom3tools should refuse this mutation"
    assert "conformance" in failed, f"the in-process check missed: {name}"
    with pytest.raises(OutputValidationError):  # and in the hot path, without dicom3tools
        validate_outputs(source, [broken["SEG"], broken["SR"]], encoded=files, tools=False)


def test_an_unreadable_file_is_an_error_not_a_crash(built: tuple[Dataset, dict[str, Dataset]]) -> None:
    source, outputs = built
    data = encode(outputs["SR"])
    assert check_output(source, data[: len(data) // 3])
    assert check_output(source, b"not dicom at all")
