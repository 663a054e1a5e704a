"""C-STORE SCU for one object to one ``AET@host:port`` destination.

Each transfer syntax is proposed in a presentation context of its own: the object's as stored,
then Explicit and Implicit VR Little Endian. A peer that takes the stored syntax gets the stored
bytes' dataset unchanged (a deflated SEG stays deflated: a peer that chose among the syntaxes of
one context would often take an uncompressed one); one that does not gets it re-encoded
uncompressed (possible for the uncompressed and deflated syntaxes lusai writes).
"""

from __future__ import annotations

from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.core.dicom import permanent_failure, stored
from service.core.settings import Destination, Settings


class DeliveryError(Exception):
    """The peer could not be reached or refused the object; ``permanent`` means do not retry."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


#: Seconds a probe waits for a destination to accept the TCP connection (a host that is down
#: drops the SYN; the sweep must not wait the full ACSE timeout for each such destination).
ECHO_CONNECT_TIMEOUT = 5.0


def c_echo(destination: Destination, settings: Settings) -> None:
    """A C-ECHO (Verification) to ``destination``; raises :class:`DeliveryError` unless it succeeds."""
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = min(settings.acse_timeout, 10.0)
    ae.connection_timeout = ECHO_CONNECT_TIMEOUT
    ae.add_requested_context(Verification)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"association with {destination} not established")
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if not status or "Status" not in status or int(status.Status) != 0:
        raise DeliveryError("C-ECHO not answered with success")


def c_store(path: Path, destination: Destination, settings: Settings) -> None:
    """Send the file at ``path``. When the peer accepts its transfer syntax, the file's own bytes
    go out as stored (pynetdicom reads them from the file: nothing is decoded or encoded again);
    otherwise its dataset, re-encoded in a syntax the peer accepted."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    ae = AE(ae_title=settings.ae_title)
    ae.acse_timeout = settings.acse_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.network_timeout = settings.network_timeout
    for syntax in dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]):
        ae.add_requested_context(ds.SOPClassUID, syntax)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if _sop_class_refused(assoc, ds.SOPClassUID):
            raise DeliveryError(
                f"{destination} does not accept SOP class {ds.SOPClassUID}:"
                " give it a viewer profile whose outputs it stores (LUSAI_DESTINATION_PROFILES)",
                permanent=True,
            )
        raise DeliveryError(f"association with {destination} not established")
    try:
        as_stored = any(
            cx.abstract_syntax == ds.SOPClassUID and cx.transfer_syntax[0] == ts
            for cx in assoc.accepted_contexts
        )
        status = assoc.send_c_store(path if as_stored else pydicom.dcmread(path))
    finally:
        assoc.release()
    if not status or "Status" not in status:
        raise DeliveryError("no C-STORE response (connection lost or timed out)")
    code = int(status.Status)
    if stored(code):
        return
    raise DeliveryError(f"C-STORE refused with status 0x{code:04X}", permanent=permanent_failure(code))


def _sop_class_refused(assoc: Association, sop_class: str) -> bool:
    """The peer answered and refused every context of the SOP class as an abstract syntax it does
    not support (PS3.8 9.3.3.2 result 3); retrying cannot change that (e.g. Orthanc 1.10 and the
    Label Map Segmentation class unless UnknownSopClassAccepted is set)."""
    refused = [cx for cx in assoc.rejected_contexts if cx.abstract_syntax == sop_class]
    return bool(refused) and all(cx.result == 0x03 for cx in refused)
