from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Destination, Settings


def test_embedded_defaults_live_under_data_dir(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path)
    assert s.db_url == f"sqlite:///{tmp_path}/lusai.sqlite"
    assert s.storage == tmp_path / "storage"
    assert s.embedded_broker
    assert s.dicom_port == 11112 and s.api_port == 8000 and s.ae_title == "LUSAI"


def test_environment_contract(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUSAI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LUSAI_DICOM_PORT", "11200")
    monkeypatch.setenv("LUSAI_API_PORT", "8100")
    monkeypatch.setenv("LUSAI_AE_TITLE", "LUS_AI")
    monkeypatch.setenv("LUSAI_ALLOWED_CALLING_AES", "SCANNER1, ORTHANC")
    monkeypatch.setenv("LUSAI_DEFAULT_DESTINATION", "PACS@pacs.example.org:104")
    monkeypatch.setenv("LUSAI_DESTINATIONS", "SCANNER1=WS1@10.0.0.5:11112")
    s = Settings()
    assert (s.dicom_port, s.api_port, s.ae_title) == (11200, 8100, "LUS_AI")
    assert s.allowed_calling_aes == ["SCANNER1", "ORTHANC"]
    assert s.destination_for("SCANNER1") == Destination(ae_title="WS1", host="10.0.0.5", port=11112)
    assert str(s.destination_for("OTHER")) == "PACS@pacs.example.org:104"
    assert s.ae_allowed("ORTHANC", "10.1.1.1") and not s.ae_allowed("EVIL", "127.0.0.1")


def test_allow_list_star_and_default(tmp_path: Path) -> None:
    assert Settings(data_dir=tmp_path, allowed_calling_aes="*").ae_allowed("ANY", "10.0.0.9")
    default = Settings(data_dir=tmp_path)
    assert default.ae_allowed("ANY", "127.0.0.1")
    assert not default.ae_allowed("ANY", "10.0.0.9")  # secure by default: no list, loopback only


@pytest.mark.parametrize(
    "field,value",
    [
        ("ae_title", "WAY_TOO_LONG_AE_TITLE"),
        ("ae_title", "BACK\\SLASH"),
        ("dicom_port", "0"),
        ("default_destination", "PACS@host"),
        ("destinations", "NOEQUALS"),
        ("device", "tpu"),
    ],
)
def test_invalid_values_fail_at_start(tmp_path: Path, field: str, value: str) -> None:
    with pytest.raises(ValidationError):
        Settings(data_dir=tmp_path, **{field: value})


def test_destination_ipv6() -> None:
    d = Destination.parse("PACS@[::1]:4242")
    assert (d.host, d.port) == ("::1", 4242)
