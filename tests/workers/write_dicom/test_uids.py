from __future__ import annotations

from dataclasses import replace

import pytest
from pydicom.uid import UID

from service.core.dicom import OutputKind
from tests.factories import MODEL
from workers.write_dicom.uids import device_uid, frame_of_reference_uid, output_uids

SOURCE = "1.2.3.4.5.6.7"


def test_same_inputs_give_same_uids() -> None:
    assert output_uids(SOURCE, MODEL, OutputKind.SEG) == output_uids(SOURCE, MODEL, OutputKind.SEG)


@pytest.mark.parametrize(
    ("source", "model", "kind"),
    [
        ("1.2.3.4.5.6.8", MODEL, OutputKind.SEG),
        (SOURCE, replace(MODEL, version="1.2.1"), OutputKind.SEG),
        (SOURCE, replace(MODEL, name="other"), OutputKind.SEG),
        (SOURCE, replace(MODEL, package_sha256="ef" * 32), OutputKind.SEG),  # same version, new package
        (SOURCE, MODEL, OutputKind.SR),
        (SOURCE, MODEL, OutputKind.SC),
    ],
)
def test_any_input_change_gives_new_uids(source: str, model: object, kind: OutputKind) -> None:
    base = output_uids(SOURCE, MODEL, OutputKind.SEG)
    other = output_uids(source, model, kind)  # type: ignore[arg-type]
    assert other.series_instance_uid != base.series_instance_uid
    assert other.sop_instance_uid != base.sop_instance_uid


def test_device_uid_names_the_package() -> None:
    assert device_uid(MODEL) == device_uid(replace(MODEL))
    assert device_uid(MODEL) != device_uid(replace(MODEL, package_sha256="ef" * 32))


def test_series_and_instance_differ_and_are_valid() -> None:
    uids = output_uids(SOURCE, MODEL, OutputKind.SR)
    assert uids.series_instance_uid != uids.sop_instance_uid
    for uid in (
        uids.series_instance_uid,
        uids.sop_instance_uid,
        device_uid(MODEL),
        frame_of_reference_uid(SOURCE),
    ):
        assert UID(uid).is_valid and len(uid) <= 64


def test_configurable_root() -> None:
    uids = output_uids(SOURCE, MODEL, OutputKind.SC, root="1.2.826.0.1.99999")
    assert uids.sop_instance_uid.startswith("1.2.826.0.1.99999.")
    assert uids != output_uids(SOURCE, MODEL, OutputKind.SC)
