"""DICOMweb destinations and their settings: one Destination class with a transport, URLs in
the destination settings, credentials only in LUSAI_DICOMWEB_AUTH and never echoed."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Destination, Settings


def test_a_url_is_a_stow_rs_destination_named_by_its_url() -> None:
    d = Destination.parse(" HTTPS://PACS.Example.org:8443/dicom-web/ ")
    assert d.transport == "stowrs" and d.url == "https://pacs.example.org:8443/dicom-web"
    assert str(d) == d.name == d.url
    assert Destination.parse(str(d)) == d  # the outbox row's text parses back to the same
    assert Destination.parse("http://[::1]:8042/dicom-web").url == "http://[::1]:8042/dicom-web"
    assert Destination.parse("http://10.0.0.5").url == "http://10.0.0.5"


def test_dimse_destinations_are_as_before() -> None:
    d = Destination.parse("PACS@pacs.example.org:104")
    assert d.transport == "dimse" and d.name == "PACS" and d.url == ""
    assert str(d) == "PACS@pacs.example.org:104"
    assert d == Destination(ae_title="PACS", host="pacs.example.org", port=104)
    assert str(Destination.parse("PACS@[::1]:4242")) == "PACS@::1:4242"


@pytest.mark.parametrize(
    "text",
    [
        "ftp://pacs/dicom-web",
        "https://",
        "https://pacs/dicom-web?x=1",
        "https://pacs/dicom-web#frag",
        "https://pacs:99999/dicom-web",
        "https://pacs.example.org/" + "x" * 120,  # longer than the outbox column
        "PACS@host",
    ],
)
def test_bad_destinations_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Destination.parse(text)


@pytest.mark.parametrize(
    "text", ["https://bob:s3cr3t@pacs/dicom-web", "https://bob@pacs/dicom-web", "https://bob:s3/cr3t@pacs/x"]
)
def test_credentials_in_a_url_are_refused_without_repeating_them(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="LUSAI_DICOMWEB_AUTH") as direct:
        Destination.parse(text)
    assert "cr3t" not in str(direct.value) and "bob" not in str(direct.value)
    for field, value in (("default_destination", text), ("destinations", f"SCANNER=PACS@h:104,WS1={text}")):
        with pytest.raises(ValidationError) as at_start:
            Settings(data_dir=tmp_path, **{field: value})
        assert "cr3t" not in str(at_start.value) and "bob" not in str(at_start.value)
        assert "LUSAI_DICOMWEB_AUTH" in str(at_start.value)


def test_environment_mixes_both_transports(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LUSAI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("LUSAI_DEFAULT_DESTINATION", "https://pacs.example.org/dicom-web")
    monkeypatch.setenv(
        "LUSAI_DESTINATIONS", "SCANNER1=WS1@10.0.0.5:11112,SCANNER2=http://viewer:8042/dicom-web/"
    )
    s = Settings()
    assert s.destination_for("SCANNER1") == Destination(ae_title="WS1", host="10.0.0.5", port=11112)
    assert str(s.destination_for("SCANNER2")) == "http://viewer:8042/dicom-web"
    assert str(s.destination_for("OTHER")) == "https://pacs.example.org/dicom-web"
    assert s.dicomweb_timeout == 60.0 and s.dicomweb_ca is None and s.dicomweb_auth is None


def test_dicomweb_auth_json_and_comma_forms(tmp_path: Path) -> None:
    pacs, viewer = (
        Destination.parse("https://pacs.example.org/dicom-web"),
        Destination.parse("http://viewer/dw"),
    )
    basic = "Basic " + base64.b64encode(b"lusai:pa=ss:word").decode()
    as_json = {
        "https://PACS.example.org/dicom-web/": "Bearer tok=en",
        "http://viewer/dw": "basic lusai:pa=ss:word",
    }
    for text in (
        json.dumps(as_json),
        "https://pacs.example.org/dicom-web=Bearer tok=en, http://viewer/dw/=Basic lusai:pa=ss:word",
    ):
        s = Settings(data_dir=tmp_path, dicomweb_auth=text)
        assert s.dicomweb_authorization(pacs) == "Bearer tok=en"  # keyed by the normal form of the URL
        assert s.dicomweb_authorization(viewer) == basic
        assert s.dicomweb_authorization(Destination.parse("https://other/dicom-web")) is None
        assert s.dicomweb_authorization(Destination.parse("PACS@h:104")) is None
        assert "tok=en" not in repr(s) and "pa=ss" not in str(s.model_dump())


@pytest.mark.parametrize(
    "text",
    [
        "https://pacs/dicom-web=Token s3cr3t",
        "https://pacs/dicom-web=Basic s3cr3t",  # no user:password
        "https://pacs/dicom-web Bearer s3cr3t",  # no '='
        '{"https://pacs/dicom-web": ["Bearer s3cr3t"]}',
        '{"https://pacs/dicom-web": "Bearer s3cr3t"',
        "ftp://pacs=Bearer s3cr3t",
    ],
)
def test_bad_dicomweb_auth_fails_at_start_without_echoing_it(text: str, tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(data_dir=tmp_path, dicomweb_auth=text)
    assert "s3cr3t" not in str(refused.value)
