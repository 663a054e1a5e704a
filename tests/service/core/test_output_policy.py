"""Which destinations get which outputs: Settings.wants, the one place the overlay policy lives."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.core.dicom import OutputKind
from service.core.settings import Destination, Settings

PACS = Destination.parse("PACS@10.0.0.1:104")
VIEWER = Destination.parse("VIEWER@10.0.0.2:104")


def test_every_destination_gets_everything_by_default(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert all(settings.wants(kind, d) for kind in OutputKind for d in (PACS, VIEWER))


def test_overlay_only_to_the_listed_destinations(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LUSAI_OVERLAY_SC_DESTINATIONS", "VIEWER, OTHER")
    settings = Settings(data_dir=tmp_path)
    assert settings.overlay_sc_destinations == ["VIEWER", "OTHER"]
    assert settings.wants(OutputKind.SC, VIEWER) and not settings.wants(OutputKind.SC, PACS)
    assert settings.wants(OutputKind.SEG, PACS) and settings.wants(OutputKind.SR, PACS)
