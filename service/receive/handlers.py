"""C-ECHO and C-STORE handlers: transport only, each failure an explicit DIMSE status.

The store handler takes the file pynetdicom streamed to disk (``STORE_RECV_CHUNKED_DATASET``),
hands it to :func:`service.receive.ingest.ingest_file` and answers. Inference happens later,
outside the association.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pynetdicom import events
from sqlalchemy.exc import SQLAlchemyError

from service.logs import ctx
from service.receive.ingest import ingest_file
from service.receive.spool import spool_object
from service.receive.validate import (
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    RejectedObject,
)
from service.settings import Settings
from service.store.files import ObjectStore, StorageFull

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000


def handle_echo(event: events.Event) -> int:
    return STATUS_SUCCESS


def make_store_handler(settings: Settings, store: ObjectStore):  # type: ignore[no-untyped-def]
    """Bind settings and storage into an EVT_C_STORE handler."""

    def handle_store(event: events.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip() or None
        src = Path(event.dataset_path)
        size = src.stat().st_size
        if size > settings.max_object_bytes:
            log.warning("object refused: too large", extra=ctx(calling_ae=calling_ae, bytes=size))
            return STATUS_OUT_OF_RESOURCES
        try:
            tmp = store.new_temp()
            src.replace(tmp)  # same filesystem: pynetdicom's tempdir is the store's tmp
        except OSError:
            log.exception("could not take over the received file", extra=ctx(calling_ae=calling_ae))
            return STATUS_OUT_OF_RESOURCES
        try:
            ingest_file(tmp, calling_ae=calling_ae, settings=settings, store=store)
        except RejectedObject as exc:
            log.warning(
                "object refused",
                extra=ctx(calling_ae=calling_ae, reason=exc.reason, status=f"0x{exc.dimse_status:04X}"),
            )
            return exc.dimse_status
        except StorageFull:
            log.error("object refused: storage full", extra=ctx(calling_ae=calling_ae))
            return STATUS_OUT_OF_RESOURCES
        except SQLAlchemyError as exc:
            # The object is already stored; keep a spool record so recovery indexes it later.
            key = getattr(exc, "lusai_storage_key", None)
            if key is not None and spool_object(settings, key, calling_ae):
                log.error("database unavailable, object spooled", extra=ctx(calling_ae=calling_ae, key=key))
                return STATUS_SUCCESS
            log.exception("database unavailable", extra=ctx(calling_ae=calling_ae))
            return STATUS_PROCESSING_FAILURE
        except OSError as exc:
            if exc.errno == 28:
                return STATUS_OUT_OF_RESOURCES
            log.exception("storage error", extra=ctx(calling_ae=calling_ae))
            return STATUS_PROCESSING_FAILURE
        return STATUS_SUCCESS

    return handle_store
