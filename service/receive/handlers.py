"""C-ECHO and C-STORE handlers: transport only, each failure an explicit DIMSE status.

The store handler takes the file pynetdicom streamed to disk (``STORE_RECV_CHUNKED_DATASET`` into
:class:`service.receive.pynetdicom_adapter.IncomingObject`, already hashed and size-checked; or,
on pynetdicom's public path, its own temporary file, checked and hashed here), hands it to
:func:`service.core.ingest.ingest_file` and answers. Inference happens later, outside the
association. No handler lets an exception escape: pynetdicom would answer 0xC211 and log a
traceback that may quote the dataset, so every outcome is mapped here.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

from pynetdicom import events
from sqlalchemy.exc import SQLAlchemyError

from service.core.dicom import STATUS_OUT_OF_RESOURCES, STATUS_PROCESSING_FAILURE, STATUS_SUCCESS
from service.core.header import RejectedObject
from service.core.ingest import ingest_file
from service.core.logs import ctx
from service.core.runtime import Runtime
from service.core.storage import StorageFull
from service.receive.pynetdicom_adapter import discard_partial, incoming_of
from service.receive.spool import spool_object

log = logging.getLogger(__name__)


def handle_echo(event: events.Event) -> int:
    """C-ECHO: 0x0000 Success; the association itself was already vetted."""
    return STATUS_SUCCESS


def handle_connection_lost(event: events.Event) -> None:
    """EVT_ABORTED / EVT_CONN_CLOSE: delete the half-received object of a dropped association."""
    discard_partial(event.assoc)


def _announced(event: events.Event) -> tuple[str, str] | None:
    req = event.request
    cls, inst = getattr(req, "AffectedSOPClassUID", None), getattr(req, "AffectedSOPInstanceUID", None)
    return (str(cls), str(inst)) if cls and inst else None


def make_store_handler(runtime: Runtime) -> Callable[[events.Event], int]:
    """Bind the SCP process's runtime (settings, storage, database, queue) into an EVT_C_STORE handler."""
    settings, store = runtime.settings, runtime.store

    def handle_store(event: events.Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip() or None
        sink = incoming_of(event.request)
        digest: tuple[str, int] | None = None
        if sink is not None:
            if sink.oversize:
                sink.discard()
                log.warning("object refused: too large", extra=ctx(calling_ae=calling_ae, bytes=sink.size))
                return STATUS_OUT_OF_RESOURCES  # 0xA700 Refused: Out of Resources (size limit)
            if sink.error is not None:
                err = sink.error
                sink.discard()
                if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                    log.error("object refused: storage full", extra=ctx(calling_ae=calling_ae))
                    return STATUS_OUT_OF_RESOURCES  # 0xA700 Refused: Out of Resources (disk full)
                log.error(
                    "object refused: storage write error", extra=ctx(calling_ae=calling_ae, errno=err.errno)
                )
                return STATUS_PROCESSING_FAILURE  # 0x0110 Failure: Processing failure
            try:
                sink.sync()
            except OSError as exc:
                sink.discard()
                log.error("object refused: fsync failed", extra=ctx(calling_ae=calling_ae, errno=exc.errno))
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    return STATUS_OUT_OF_RESOURCES  # 0xA700: delayed allocation failed at fsync
                return STATUS_PROCESSING_FAILURE  # 0x0110
            sink.close()
            tmp = Path(sink.name)
            digest = (sink.sha256, sink.size)
            # The file is ours now: pynetdicom's clean-up after this handler unlinks ``name``, and
            # once we have renamed the file that path could belong to another receive.
            sink.name = ""
        else:  # public path: pynetdicom's own temporary file (adapter not installed)
            src = Path(event.dataset_path)
            size = src.stat().st_size
            if size > settings.max_object_bytes:
                src.unlink(missing_ok=True)
                log.warning("object refused: too large", extra=ctx(calling_ae=calling_ae, bytes=size))
                return STATUS_OUT_OF_RESOURCES  # 0xA700 Refused: Out of Resources (size limit)
            try:
                tmp = store.new_temp()
                try:
                    shutil.move(src, tmp)  # a rename, or a copy when the temp dir is another filesystem
                except OSError:
                    tmp.unlink(missing_ok=True)
                    raise
            except OSError:
                src.unlink(missing_ok=True)
                log.exception("could not take over the received file", extra=ctx(calling_ae=calling_ae))
                return STATUS_OUT_OF_RESOURCES  # 0xA700
        return _ingest(event, tmp, digest, calling_ae)

    def _ingest(
        event: events.Event, tmp: Path, digest: tuple[str, int] | None, calling_ae: str | None
    ) -> int:
        try:
            ingest_file(
                tmp,
                calling_ae=calling_ae,
                runtime=runtime,
                digest=digest,
                announced=_announced(event),
            )
        except RejectedObject as exc:
            log.warning(
                "object refused",
                extra=ctx(calling_ae=calling_ae, reason=exc.reason, status=f"0x{exc.dimse_status:04X}"),
            )
            return exc.dimse_status  # 0xA900 / 0xC000 / 0x0122, chosen in validate.py
        except StorageFull:
            log.error("object refused: storage full", extra=ctx(calling_ae=calling_ae))
            return STATUS_OUT_OF_RESOURCES  # 0xA700 Refused: Out of Resources
        except SQLAlchemyError as exc:
            # The object is already stored; a spool record lets recovery index and queue it later,
            # so the sender gets Success and does not need to retry.
            key = getattr(exc, "lusai_storage_key", None)
            if key is not None and spool_object(settings, key, calling_ae):
                log.error(
                    "database unavailable, object spooled",
                    extra=ctx(calling_ae=calling_ae, key=key, error=type(exc).__name__),
                )
                return STATUS_SUCCESS  # 0x0000: stored and spooled, indexed by the recovery sweep
            log.error("database unavailable", extra=ctx(calling_ae=calling_ae, error=type(exc).__name__))
            return STATUS_PROCESSING_FAILURE  # 0x0110: nothing kept, the sender retries
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                log.error("object refused: storage full", extra=ctx(calling_ae=calling_ae))
                return STATUS_OUT_OF_RESOURCES  # 0xA700
            log.error("storage error", extra=ctx(calling_ae=calling_ae, error=type(exc).__name__))
            return STATUS_PROCESSING_FAILURE  # 0x0110 Failure: Processing failure
        except Exception as exc:  # a bug must cost one object, never the association or the process
            log.error("unexpected ingest error", extra=ctx(calling_ae=calling_ae, error=type(exc).__name__))
            return STATUS_PROCESSING_FAILURE  # 0x0110
        return STATUS_SUCCESS  # 0x0000 Success

    return handle_store
