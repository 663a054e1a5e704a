"""Attributes every lusai output shares with its source (PS3.3 A.1.2 entity model).

Outputs join the source's patient and study as a new series, so the Patient and General Study
module attributes are copied verbatim (dcentvfy checks that), and the algorithm is recorded in the
General/Enhanced General Equipment modules (C.7.5.1, C.7.5.2).
"""

from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

from service.core.model_package import ModelInfo

MANUFACTURER = "lusai"

#: Patient module (C.7.1.1) and General/Patient Study modules (C.7.2.1, C.7.2.2).
PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "PatientBirthDate",
    "PatientSex",
    "OtherPatientIDsSequence",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)
#: Type 2 attributes that must be present even when the source lacks them.
PATIENT_STUDY_TYPE2 = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass(frozen=True)
class SeriesInfo:
    series_instance_uid: str
    sop_instance_uid: str
    series_number: int
    series_description: str


def copy_patient_study(source: Dataset, ds: Dataset) -> None:
    """Copy patient and study identity; never log these values."""
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for kw in PATIENT_STUDY_KEYWORDS:
        if kw in source:
            ds[kw] = copy.deepcopy(source[kw])  # never share elements: edits must not leak back
    for kw in PATIENT_STUDY_TYPE2:
        if kw not in ds:
            setattr(ds, kw, None)


def series_laterality(source: Dataset) -> str | None:
    """Laterality (0020,0060) of the source series or image; only R or L are valid (C.7.3.1)."""
    for kw in ("Laterality", "ImageLaterality"):
        value = str(source.get(kw, "") or "").upper()
        if value in ("R", "L"):
            return value
    return None


def algorithm_parameters(model: ModelInfo) -> dict[str, str]:
    """The hashes that name the exact weights and model package (SEG AlgorithmParameters, TID 4019)."""
    params = {"weights_sha256": model.weights_sha256}
    if model.package_sha256:
        params["package_sha256"] = model.package_sha256
    return params


def set_series_and_equipment(
    ds: Dataset,
    source: Dataset,
    series: SeriesInfo,
    model: ModelInfo,
    modality: str,
    *,
    now: dt.datetime,
    with_laterality: bool = True,
) -> None:
    """General Series, General Equipment and SOP Common attributes shared by all outputs.

    ``with_laterality``: copy the series Laterality; dciodvfy rejects it (Type 2C) in the SEG IOD,
    which carries laterality as an anatomic region modifier instead.
    """
    ds.Modality = modality
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.SeriesNumber = series.series_number
    ds.SeriesDescription = series.series_description
    ds.SOPInstanceUID = series.sop_instance_uid
    ds.InstanceNumber = 1
    laterality = series_laterality(source)
    if laterality and with_laterality:
        ds.Laterality = laterality
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = model.name
    ds.SoftwareVersions = model.version
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")


def file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str = ExplicitVRLittleEndian
) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    return meta


def source_image_item(source: Dataset, frame_numbers: Iterable[int] | None = None) -> Dataset:
    """SOP Instance Reference Macro (C.17.2) item, optionally with ReferencedFrameNumber."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_numbers is not None:
        item.ReferencedFrameNumber = list(frame_numbers)
    return item


def referenced_series(source: Dataset) -> list[Dataset]:
    """ReferencedSeriesSequence item of the Common Instance Reference module (C.12.2)."""
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = [source_image_item(source)]
    return [series]


def lossy_history(source: Dataset, ds: Dataset, extra: tuple[str, str] | None = None) -> None:
    """Lossy Image Compression attributes (C.7.6.1.1.5): once "01" an image's derivatives stay
    "01", with the source's ratios/methods followed by ``extra`` (ratio, method) if re-encoded."""
    ratios = [str(v) for v in _as_list(source.get("LossyImageCompressionRatio"))]
    methods = [str(v) for v in _as_list(source.get("LossyImageCompressionMethod"))]
    lossy = str(source.get("LossyImageCompression", "00")) == "01"
    if extra is not None:
        lossy = True
        ratios.append(extra[0])
        methods.append(extra[1])
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy and ratios:
        ds.LossyImageCompressionRatio = ratios
    if lossy and methods:
        ds.LossyImageCompressionMethod = methods


def _as_list(value: object) -> list[object]:
    if value is None or value == "":
        return []
    if isinstance(value, str | int | float):
        return [value]
    return list(value)  # type: ignore[call-overload]


def metadata_copy(source: Dataset) -> Dataset:
    """The source without pixel data, for highdicom evidence and image-library entries."""
    meta = Dataset()
    for elem in source:
        if elem.tag.group == 0x7FE0:
            continue
        meta.add(copy.deepcopy(elem))
    if hasattr(source, "file_meta"):
        meta.file_meta = copy.deepcopy(source.file_meta)
    return meta
