"""configure_libraries(): the library switches every entry point sets once at start-up."""

from __future__ import annotations

import logging
import warnings

import pydicom.config
import pytest
from pynetdicom import _config

from service.core.libraries import configure_libraries

_SWITCHES = (
    "LOG_HANDLER_LEVEL",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
    "STORE_RECV_CHUNKED_DATASET",
)
_LOGGERS = ("pynetdicom", "pydicom", "multipart")


@pytest.fixture(autouse=True)
def _restore(monkeypatch: pytest.MonkeyPatch) -> None:
    """The switches are process-wide: put back what other tests in this session expect."""
    for name in _SWITCHES:
        monkeypatch.setattr(_config, name, getattr(_config, name))
    settings = pydicom.config.settings
    monkeypatch.setattr(settings, "reading_validation_mode", settings.reading_validation_mode)
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))
    for name in _LOGGERS:
        monkeypatch.setattr(logging.getLogger(name), "level", logging.getLogger(name).level)


def test_sets_what_keeps_phi_out_of_library_logs() -> None:
    configure_libraries()
    assert _config.LOG_HANDLER_LEVEL == "none"
    assert not _config.LOG_REQUEST_IDENTIFIERS and not _config.LOG_RESPONSE_IDENTIFIERS
    assert _config.STORE_RECV_CHUNKED_DATASET
    assert logging.getLogger("pynetdicom").getEffectiveLevel() == logging.CRITICAL
    assert logging.getLogger("pydicom").getEffectiveLevel() == logging.ERROR
    assert logging.getLogger("highdicom").getEffectiveLevel() == logging.WARNING  # logs source UIDs at INFO
    assert pydicom.config.settings.reading_validation_mode == pydicom.config.IGNORE
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        configure_libraries()  # the filter goes back on top of the "default" just added
        warnings.warn_explicit("value quoted", UserWarning, "x.py", 1, module="pydicom.valuerep")
    assert caught == []


def test_idempotent() -> None:
    configure_libraries()
    filters = list(warnings.filters)
    configure_libraries()
    assert warnings.filters == filters
