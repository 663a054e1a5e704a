"""pydicom, pynetdicom and warnings as lusai needs them, set once per process at its entry point.

These are process-wide switches of third-party libraries, so they belong to the process, not to an
object it builds: each entry point (``lusai scp/api/worker/serve`` and a plain ``celery worker``)
calls :func:`configure_libraries` once at start-up, right after
:func:`service.core.logs.configure_logging`; nothing else flips them. Tests that build an SCP in
their own process call it in the fixture and restore the previous values afterwards.
"""

from __future__ import annotations

import logging
import warnings

import pydicom.config
from pynetdicom import _config as pynetdicom_config


def configure_libraries() -> None:
    """Keep patient data out of library logs and stream received data sets to disk (idempotent).

    * pynetdicom: no standard event handlers (they log PDUs and data sets) and no identifier
      logging; its logger only shows CRITICAL, because its errors may carry a traceback that
      quotes a data set. Our own code logs every outcome, without PHI.
    * pynetdicom receives each C-STORE data set into a file (``STORE_RECV_CHUNKED_DATASET``)
      rather than memory; the SCP relies on it (in-memory data sets were 2-3x slower).
    * pydicom: reading validation off and its UserWarnings ignored, since both quote element
      values (names, IDs); we validate the attributes we use ourselves.
    * python-multipart (FastAPI forms) logs every part at DEBUG.
    * highdicom logs the source's SOP Instance UID at INFO while building SEG and SR (UIDs can
      carry dates and site codes, and lusai never logs them; found by bench/chaos/fuzz.py).
    """
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.STORE_RECV_CHUNKED_DATASET = True
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom\.")
    logging.getLogger("multipart").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)
