"""The C-STORE SCP: AE, presentation contexts, TLS and handler bindings; nothing else.

Built on pynetdicom's public API, with one exception kept in
:mod:`service.receive.pynetdicom_adapter`: received data sets stream straight into a hashing,
size-capped temporary file on the storage filesystem and are renamed into content-addressed
storage (in-memory data sets were 2-3x slower; pynetdicom's own streamed file is unhashed, uncapped
and in the system temp dir). The adapter checks pynetdicom's internals when it is installed and
falls back to the public path when they changed. For many concurrent senders run several SCP
processes on one port (``lusai scp --processes N``): each binds with ``SO_REUSEPORT`` and the
kernel spreads connections between them, so one process's GIL no longer caps throughput.
``bench/ingest.py`` measures both against DCMTK ``storescp --fork``.

The process must have called :func:`service.core.libraries.configure_libraries` first (the
entry points do); :func:`make_server` flips no library switch itself.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from typing import Any

from pydicom.uid import (
    UID,
    AllTransferSyntaxes,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import register_uid, uid_to_service_class
from pynetdicom.transport import ThreadedAssociationServer

from service.core.dicom import US_IMAGE_RETIRED, US_MULTIFRAME_RETIRED, US_SOP_CLASSES
from service.core.logs import ctx
from service.core.runtime import Runtime
from service.core.settings import Settings
from service.receive import pynetdicom_adapter
from service.receive.handlers import handle_connection_lost, handle_echo, make_store_handler

log = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"

# Uncompressed first (cheapest for us), then every compressed syntax scanners really send; the
# object is stored exactly as received, so accepting a syntax costs nothing but a decoder later.
# A compressed syntax the sender proposes first still wins (prefer_senders_syntax).
TRANSFER_SYNTAXES: list[str] = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    *[
        ts
        for ts in AllTransferSyntaxes
        if UID(ts).is_compressed and ts not in (DeflatedExplicitVRLittleEndian,)
    ],
]


def _storage_sop_classes() -> list[UID]:
    return [cx.abstract_syntax for cx in AllStoragePresentationContexts if cx.abstract_syntax]


class ReusePortServer(ThreadedAssociationServer):
    """pynetdicom's threaded server plus SO_REUSEPORT (several processes, one port) and TCP_NODELAY.

    ``settings`` (keyword, passed through ``AE.make_server``) decides which peers may connect.
    """

    def __init__(self, *args: Any, settings: Settings, **kwargs: Any) -> None:
        self.settings = settings  # set before super(), which binds and listens
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        assert self.socket is not None
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, addr

    def verify_request(self, request: Any, client_address: Any) -> bool:
        # With no allow-list configured only local senders may associate (secure by default).
        settings = self.settings
        if settings.allowed_calling_aes:
            return True
        host = str(client_address[0]) if isinstance(client_address, tuple) else "127.0.0.1"
        ok = settings.ae_allowed("", host)
        if not ok:
            log.warning(
                "connection refused: not local and no LUSAI_ALLOWED_CALLING_AES", extra=ctx(peer=host)
            )
        return ok


# Retired US classes scanners still send; pynetdicom does not know them as storage classes and
# would abort the association on their C-STORE unless they are registered.
_RETIRED_US = {
    US_MULTIFRAME_RETIRED: "UltrasoundMultiFrameImageStorageRetired",
    US_IMAGE_RETIRED: "UltrasoundImageStorageRetired",
}


def _register_retired_classes() -> None:
    for uid, keyword in _RETIRED_US.items():
        if uid_to_service_class(uid) is not StorageServiceClass:
            register_uid(uid, keyword, StorageServiceClass)


def build_ae(settings: Settings) -> AE:
    _register_retired_classes()
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_pdu_size = settings.max_pdu
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    ae.maximum_associations = settings.max_associations
    if settings.allowed_calling_aes and "*" not in settings.allowed_calling_aes:
        ae.require_calling_aet = settings.allowed_calling_aes  # A-ASSOCIATE-RJ (1, 1, 3) otherwise
    ae.add_supported_context(VERIFICATION)
    sop_classes = set(US_SOP_CLASSES)
    if settings.unsupported_sop_class == "ignore":
        sop_classes |= set(_storage_sop_classes())
    for sop_class in sorted(sop_classes):
        ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
    return ae


def prefer_senders_syntax(event: evt.Event) -> None:
    """EVT_REQUESTED: accept the sender's own compressed syntax rather than our first choice.

    pynetdicom gives each proposed context the first of OUR syntaxes that was proposed, so a
    context [JPEG Baseline, Explicit LE, Implicit LE] (a JPEG cine from an SCU that offers to
    decompress) was agreed as Explicit LE: the sender had to transcode, or failed when it could
    not, and we stored a decompressed copy. When a context proposes an encapsulated syntax first
    and we support it, that syntax moves to the front of this association's own copy of our list;
    the choice stays among syntaxes both sides support, and uncompressed proposals are unchanged.
    """
    proposed: dict[str, list[str]] = {}
    for cx in event.assoc.requestor.requested_contexts:
        first = UID(cx.transfer_syntax[0]) if cx.transfer_syntax else UID("")
        if cx.abstract_syntax and first.is_transfer_syntax and first.is_encapsulated:
            proposed.setdefault(cx.abstract_syntax, []).append(first)
    if not proposed:
        return
    contexts = event.assoc.acceptor.supported_contexts  # a per-association copy of the AE's
    for cx in contexts:
        front = [ts for ts in proposed.get(cx.abstract_syntax or "", []) if ts in cx.transfer_syntax]
        if front:
            cx.transfer_syntax = [ts for ts in dict.fromkeys([*front, *cx.transfer_syntax])]
    event.assoc.acceptor.supported_contexts = contexts


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """Server TLS context (TLS 1.2+, BCP 195) when a certificate is configured, else None."""
    if settings.dicom_tls_cert is None and settings.dicom_tls_key is None:
        return None
    if settings.dicom_tls_cert is None or settings.dicom_tls_key is None:
        raise ValueError("LUSAI_DICOM_TLS_CERT and LUSAI_DICOM_TLS_KEY must be set together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.dicom_tls_cert), str(settings.dicom_tls_key))
    if settings.dicom_tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.dicom_tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: only senders with a CA-signed certificate
    return context


def make_server(runtime: Runtime, *, stream_adapter: bool = True) -> ReusePortServer:
    """Bind the SCP (not yet serving) on the process's runtime and install its receive adapter.

    ``stream_adapter=False`` receives through pynetdicom's public API only (what a changed
    pynetdicom falls back to); tests use it to run that path.
    """
    if not _config.STORE_RECV_CHUNKED_DATASET:
        raise RuntimeError("call service.core.libraries.configure_libraries() at the entry point first")
    settings, store = runtime.settings, runtime.store
    path = pynetdicom_adapter.install(store.tmp_dir, settings.max_object_bytes, enabled=stream_adapter)
    ae = build_ae(settings)
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, prefer_senders_syntax),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, make_store_handler(runtime)),
        (evt.EVT_ABORTED, handle_connection_lost),
        (evt.EVT_CONN_CLOSE, handle_connection_lost),
    ]
    server = ae.make_server(
        (settings.dicom_host, settings.dicom_port),
        evt_handlers=handlers,
        server_class=ReusePortServer,
        ssl_context=tls_context(settings),
        settings=settings,
    )
    log.info(
        "DICOM SCP listening",
        extra=ctx(
            ae_title=settings.ae_title,
            port=settings.dicom_port,
            pid=os.getpid(),
            tls=settings.dicom_tls_cert is not None,
            streaming_sink=path.sink,
            fast_recv=path.fast_recv,
        ),
    )
    return server  # type: ignore[return-value]
