"""What each destination is sent: Settings.profile_for, the one place the output policy lives."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.profiles import PROFILES, ViewerProfile
from service.core.settings import Destination, Settings

PACS = Destination.parse("PACS@10.0.0.1:104")
VIEWER = Destination.parse("VIEWER@10.0.0.2:104")


def test_default_profile_displays_in_ohif(tmp_path: Path) -> None:
    """Out of the box: SEG auto (BINARY only where OHIF decodes it), the viewer-safe SR, no SC."""
    settings = Settings(data_dir=tmp_path)
    for destination in (PACS, VIEWER, None):
        assert settings.profile_for(destination) == ViewerProfile("auto", "viewer", False)
    assert settings.profile_for(None) == replace(PROFILES["ohif"], summary="")  # the ohif profile


def test_overlay_only_to_the_listed_destinations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUSAI_OVERLAY_SC", "true")
    monkeypatch.setenv("LUSAI_OVERLAY_SC_DESTINATIONS", "VIEWER, OTHER")
    settings = Settings(data_dir=tmp_path)
    assert settings.overlay_sc_destinations == ["VIEWER", "OTHER"]
    assert settings.profile_for(VIEWER).overlay_sc and not settings.profile_for(PACS).overlay_sc
    assert settings.profile_for(None).overlay_sc  # kept for the REST API


def test_named_profiles_per_destination(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUSAI_DESTINATION_PROFILES", "PACS=archive, VIEWER=weasis")
    monkeypatch.setenv("LUSAI_SEG_ENCODING", "labelmap")
    settings = Settings(data_dir=tmp_path)
    assert settings.profile_for(PACS) is PROFILES["archive"]
    assert settings.profile_for(VIEWER) is PROFILES["weasis"]
    other = Destination.parse("OTHER@10.0.0.3:104")
    assert settings.profile_for(other).seg_encoding == "labelmap"  # the global settings


@pytest.mark.parametrize("value", ["PACS=nonsense", "archive", "=ohif"])
def test_a_wrong_profile_mapping_fails_at_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("LUSAI_DESTINATION_PROFILES", value)
    with pytest.raises(ValidationError, match="profile"):
        Settings(data_dir=tmp_path)


def test_every_profile_is_documented() -> None:
    text = (Path(__file__).parents[3] / "docs" / "dicom-outputs.md").read_text()
    for name in PROFILES:
        assert f"`{name}`" in text, name


def test_a_dicomweb_destination_is_named_by_its_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUSAI_DESTINATION_PROFILES", "HTTPS://PACS.example.org/dicom-web/=archive")
    settings = Settings(data_dir=tmp_path)
    web = Destination.parse("https://pacs.example.org/dicom-web")
    assert settings.profile_for(web) is PROFILES["archive"]
