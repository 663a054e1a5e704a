"""Deterministic UIDs for the outputs of one analysis.

A retried job must overwrite, not duplicate, what it already sent to PACS, so every UID is a hash
(pydicom ``generate_uid`` with ``entropy_srcs``) of the source SOP Instance UID, the model name and
version, the model package's SHA-256 (so a re-analysis with another package, even one that kept the
version, makes new objects), the object kind and the UID's role. The root is configurable so a site
can use its own registered org root (PS3.5 9.1).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

from service.core.dicom import OutputKind
from service.core.model_package import ModelInfo


@dataclass(frozen=True)
class OutputUIDs:
    series_instance_uid: str
    sop_instance_uid: str


def derive_uid(root: str, *parts: str) -> str:
    """A UID under ``root`` determined only by ``parts`` (SHA-512 based, PS3.5 B.2)."""
    if not root.endswith("."):
        root += "."
    return str(generate_uid(prefix=root, entropy_srcs=["lusai", *parts]))


def output_uids(
    source_sop_instance_uid: str,
    model: ModelInfo,
    kind: OutputKind,
    root: str = PYDICOM_ROOT_UID,
    variant: str = "",
) -> OutputUIDs:
    """Series and instance UIDs of one output object. ``variant`` names a form of the object other
    than the first one lusai wrote (a LABELMAP SEG, the viewer-shaped SR): two destinations'
    profiles may ask for both forms of one analysis, and they are different objects."""
    base = (source_sop_instance_uid, model.name, model.version, *_package(model), kind.value)
    base += (variant,) if variant else ()
    return OutputUIDs(
        series_instance_uid=derive_uid(root, *base, "series"),
        sop_instance_uid=derive_uid(root, *base, "instance"),
    )


def frame_of_reference_uid(source_sop_instance_uid: str, root: str = PYDICOM_ROOT_UID) -> str:
    """Frame of Reference for a source that has none; model-independent (pixel-grid geometry)."""
    return derive_uid(root, source_sop_instance_uid, "frame-of-reference")


def device_uid(model: ModelInfo, root: str = PYDICOM_ROOT_UID) -> str:
    """Device Observer UID of the algorithm (TID 1004), stable per model package."""
    return derive_uid(root, model.name, model.version, *_package(model), "device-observer")


def _package(model: ModelInfo) -> tuple[str, ...]:
    return (model.package_sha256,) if model.package_sha256 else ()
