"""Delivery over DICOMweb STOW-RS to a real Orthanc with its DICOMweb plugin: SEG and SR arrive
byte for byte; basic auth right and wrong; a server down then up; TLS with a CA of our own; no
credential in the logs or the outbox rows. And the answer mapping (PS3.18 10.5) on its own."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import ipaddress
import json
import logging
import secrets
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import select

from service.core import lifecycle
from service.core.models import Delivery, DeliveryState
from service.core.runtime import Runtime
from service.core.settings import Destination, Settings
from tests.conftest import ORTHANC_DICOMWEB_PLUGIN, OrthancServer
from tests.rows import get_row, stored_delivery
from workers.deliver.dimse import DeliveryError
from workers.deliver.outbox import probe_destinations, send_delivery
from workers.deliver.stow import RetryLater, outcome, retry_after, store_answer

DICOMWEB = {"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


@contextlib.contextmanager
def web_runtime(monkeypatch: pytest.MonkeyPatch, data_dir: Path, **env: str) -> Iterator[Runtime]:
    """The runtime a deliver worker would build on ``data_dir`` with these LUSAI_ settings."""
    from migrations.runner import upgrade

    monkeypatch.setenv("LUSAI_DATA_DIR", str(data_dir))
    for key, value in env.items():
        monkeypatch.setenv(f"LUSAI_{key.upper()}", value)
    settings = Settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(settings.db_url)
    with Runtime.from_settings(settings) as rt:
        yield rt


def outputs(folder: Path, frames: int = 4) -> dict[str, Path]:
    """A lusai SEG (as configured by default: BINARY, deflated) and SR of a synthetic cine."""
    from tests.factories import make_analysis, make_source
    from workers.write_dicom.build import OutputOptions, build_outputs

    source = make_source(64, 80, frames, jpeg=False)
    built = build_outputs(source, make_analysis(source), options=OutputOptions(overlay=None, validate=False))
    out = {}
    for output in built:
        path = folder / f"{output.kind.value}.dcm"
        output.dataset.save_as(path, enforce_file_format=True)
        out[output.kind.value.upper()] = path
    return out


def orthanc_copy(server: OrthancServer, sop_instance_uid: str) -> pydicom.Dataset:
    """The instance as Orthanc stored it, read back through its REST API."""
    with server.client() as c:
        found = [
            r for r in c.post("/tools/lookup", content=sop_instance_uid).json() if r["Type"] == "Instance"
        ]
        assert len(found) == 1, found
        return pydicom.dcmread(io.BytesIO(c.get(f"/instances/{found[0]['ID']}/file").content))


def _due(runtime: Runtime, delivery_id: int) -> None:
    with runtime.db.session() as s:
        d = s.get(Delivery, delivery_id)
        assert d is not None
        d.next_attempt_at = datetime.now(UTC)


# --- against Orthanc ----------------------------------------------------------------------------


@pytest.mark.network
def test_seg_and_sr_reach_orthanc_over_stow_rs(runtime: Runtime, orthanc_server: Any, tmp_path: Path) -> None:
    server = orthanc_server([ORTHANC_DICOMWEB_PLUGIN], **DICOMWEB)
    destination = str(Destination.parse(server.dicomweb + "/"))
    assert destination == server.dicomweb  # what the outbox row stores: the URL, no trailing slash
    for kind, path in outputs(tmp_path).items():
        did, uid = stored_delivery(runtime, tmp_path, destination, file=path)
        assert send_delivery(did, runtime=runtime) == ("delivered", None), get_row(
            runtime, Delivery, did
        ).last_error
        d = get_row(runtime, Delivery, did)
        assert d.state == DeliveryState.DELIVERED and d.attempts == 1 and d.destination == server.dicomweb
        got, sent = orthanc_copy(server, uid), pydicom.dcmread(path)
        assert got.SOPInstanceUID == sent.SOPInstanceUID == uid and got.Modality == kind
        assert got.StudyInstanceUID == sent.StudyInstanceUID
        if kind == "SEG":
            assert got.file_meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID  # still deflated
            assert got.PixelData == sent.PixelData
        # delivered again (a re-sent row): a second STOW-RS of the same instance is harmless
        with runtime.db.session() as s:
            assert lifecycle.resend(s, did)
        assert send_delivery(did, runtime=runtime)[0] == "delivered"


@pytest.mark.network
def test_basic_auth_right_wrong_and_missing(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, orthanc_server: Any, tmp_path: Path
) -> None:
    """401/403 are configuration errors: dead after one attempt, not 12 attempts over 4 hours."""
    server = orthanc_server(
        [ORTHANC_DICOMWEB_PLUGIN],
        AuthenticationEnabled=True,
        RegisteredUsers={"lusai": "right-pw"},
        **DICOMWEB,
    )
    seg = outputs(tmp_path)["SEG"]
    url = server.dicomweb
    cases = [
        (f"{url}=Basic lusai:right-pw", "delivered"),
        (f"{url}=Basic lusai:wrong-pw", "dead"),
        ("", "dead"),
    ]
    for n, (auth, expected) in enumerate(cases):
        with web_runtime(monkeypatch, data_dir / str(n), dicomweb_auth=auth) as rt:
            did, _ = stored_delivery(rt, tmp_path, url, file=seg)
            assert send_delivery(did, runtime=rt) == (expected, None)
            d = get_row(rt, Delivery, did)
            assert d.attempts == 1
            if expected == "dead":
                assert "HTTP 401" in (d.last_error or "") and "LUSAI_DICOMWEB_AUTH" in (d.last_error or "")


@pytest.mark.network
def test_orthanc_down_then_up(runtime: Runtime, orthanc_server: Any, tmp_path: Path) -> None:
    """A server that is down: retried with the outbox's backoff; the recovery sweep's probe (a
    QIDO-RS GET instead of C-ECHO) finds it back and its delivery goes at once."""
    server = orthanc_server([ORTHANC_DICOMWEB_PLUGIN], start=False, **DICOMWEB)
    did, uid = stored_delivery(runtime, tmp_path, server.dicomweb, file=outputs(tmp_path)["SR"])
    outcome_, delay = send_delivery(did, runtime=runtime)
    assert outcome_ == "retrying" and delay == lifecycle.DELIVERY_BACKOFF.base_s
    d = get_row(runtime, Delivery, did)
    assert d.state == DeliveryState.RETRYING and "ConnectError" in (d.last_error or "")
    _due(runtime, did)
    assert send_delivery(did, runtime=runtime) == ("retrying", 2 * lifecycle.DELIVERY_BACKOFF.base_s)
    assert probe_destinations(runtime) == 0  # still down: nothing woken
    server.start()
    assert probe_destinations(runtime) == 1  # back: woken now, not when its backoff runs out
    assert send_delivery(did, runtime=runtime) == ("delivered", None)
    assert get_row(runtime, Delivery, did).attempts == 3
    assert orthanc_copy(server, uid).SOPInstanceUID == uid


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1: (cert PEM, cert + key PEM for Orthanc)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lusai test PACS")])
    now = dt.datetime.now(dt.UTC)
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    (folder / "ca.pem").write_bytes(cert_pem)
    (folder / "orthanc.pem").write_bytes(cert_pem + key_pem)
    return folder / "ca.pem", folder / "orthanc.pem"


@contextlib.contextmanager
def tls_front(pem: Path, port: int) -> Iterator[int]:
    """A TLS-terminating proxy (Python's ssl, OpenSSL) with the certificate and key in ``pem`` in
    front of 127.0.0.1:``port``; yields its own port. Orthanc's own HTTPS cannot be used: Debian's
    Orthanc 1.10 crashes on the first TLS connection (civetweb 1.15 on OpenSSL 3)."""
    import socket
    import ssl
    import threading

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pem)
    listener = socket.create_server(("127.0.0.1", 0))

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(1 << 16):
                dst.sendall(data)
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.close()

    def serve(conn: socket.socket) -> None:
        try:
            tls = ctx.wrap_socket(conn, server_side=True)
        except (ssl.SSLError, OSError):  # the client did not trust us: what the test expects
            conn.close()
            return
        backend = socket.create_connection(("127.0.0.1", port))
        threading.Thread(target=pipe, args=(backend, tls), daemon=True).start()
        pipe(tls, backend)

    def accept() -> None:
        with contextlib.suppress(OSError):
            while True:
                conn, _ = listener.accept()
                threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield int(listener.getsockname()[1])
    finally:
        listener.close()


@pytest.mark.network
def test_tls_verified_against_lusai_dicomweb_ca(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch, orthanc_server: Any, tmp_path: Path
) -> None:
    """HTTPS to a server whose certificate our own CA signed: refused (and retried) against the
    system's CAs, delivered with LUSAI_DICOMWEB_CA; the probe speaks TLS the same way."""
    ca, pem = self_signed(tmp_path)
    server = orthanc_server([ORTHANC_DICOMWEB_PLUGIN], **DICOMWEB)
    seg = outputs(tmp_path)["SEG"]
    with tls_front(pem, server.http_port) as port:
        url = f"https://127.0.0.1:{port}/dicom-web"
        with web_runtime(monkeypatch, data_dir / "system-ca") as rt:
            did, _ = stored_delivery(rt, tmp_path, url, file=seg)
            assert send_delivery(did, runtime=rt)[0] == "retrying"  # not trusted by the system's CAs
            assert "CERTIFICATE_VERIFY_FAILED" in (get_row(rt, Delivery, did).last_error or "")
            assert probe_destinations(rt) == 0
        with web_runtime(monkeypatch, data_dir / "own-ca", dicomweb_ca=str(ca)) as rt:
            did, uid = stored_delivery(rt, tmp_path, url, file=seg, state=DeliveryState.RETRYING)
            with rt.db.session() as s:  # a retry due in an hour: the probe over TLS wakes it
                d = s.get(Delivery, did)
                assert d is not None
                d.next_attempt_at = datetime.now(UTC) + dt.timedelta(hours=1)
            assert probe_destinations(rt) == 1
            assert send_delivery(did, runtime=rt) == ("delivered", None)
    assert orthanc_copy(server, uid).PixelData == pydicom.dcmread(seg).PixelData


@pytest.mark.network
def test_credentials_never_reach_logs_or_rows(
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    orthanc_server: Any,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "pw-" + secrets.token_hex(8)
    server = orthanc_server(
        [ORTHANC_DICOMWEB_PLUGIN], AuthenticationEnabled=True, RegisteredUsers={"lusai": password}, **DICOMWEB
    )
    secret_forms = {password, base64.b64encode(f"lusai:{password}".encode()).decode()}
    caplog.set_level(logging.DEBUG)  # every logger, httpx's and httpcore's wire traces included
    files = outputs(tmp_path)
    auth = json.dumps({server.dicomweb: f"Basic lusai:{password}"})
    with web_runtime(monkeypatch, data_dir, dicomweb_auth=auth) as rt:
        good, _ = stored_delivery(rt, tmp_path, server.dicomweb, file=files["SEG"])
        assert send_delivery(good, runtime=rt)[0] == "delivered"
        server.stop()  # a failure's message is recorded too
        bad, _ = stored_delivery(rt, tmp_path, server.dicomweb, file=files["SR"])
        assert send_delivery(bad, runtime=rt)[0] == "retrying"
        assert probe_destinations(rt) == 0
        with rt.db.session() as s:
            rows = [(d.destination, d.last_error or "") for d in s.scalars(select(Delivery))]
    text = caplog.text + json.dumps(rows)
    assert "send_request_headers" in caplog.text  # httpcore's DEBUG trace was captured too
    for secret in secret_forms:
        assert secret not in text
    study_uid = str(pydicom.dcmread(files["SEG"]).StudyInstanceUID)
    assert study_uid not in text  # nor the request URL, which holds the study (httpx logs it at INFO)
    # and a URL with credentials in it is refused at start-up without repeating them
    monkeypatch.setenv("LUSAI_DEFAULT_DESTINATION", f"https://lusai:{password}@pacs.example.org/dicom-web")
    with pytest.raises(ValueError, match="LUSAI_DICOMWEB_AUTH") as refused:
        Settings()
    assert password not in str(refused.value)


# --- the answer mapping (PS3.18 10.5.3), no peer needed ------------------------------------------

UID = "1.2.826.0.1.3680043.8.498.1"
ROOT = "https://pacs.example.org/dicom-web"


def answer(stored: list[str] = (), failed: dict[str, int | None] | None = None) -> bytes:  # type: ignore[assignment]
    doc: dict[str, Any] = {}
    if stored:
        doc["00081199"] = {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [u]}} for u in stored]}
    if failed:
        items = []
        for u, reason in failed.items():
            item: dict[str, Any] = {"00081155": {"vr": "UI", "Value": [u]}}
            if reason is not None:
                item["00081197"] = {"vr": "US", "Value": [reason]}
            items.append(item)
        doc["00081198"] = {"vr": "SQ", "Value": items}
    return json.dumps(doc).encode()


def mapped(status: int, body: bytes = b"", **headers: str) -> DeliveryError | None:
    try:
        outcome(status, httpx.Headers(headers), body, UID, ROOT)
    except DeliveryError as exc:
        assert ROOT in str(exc)
        return exc
    return None


def test_success_answers() -> None:
    assert mapped(200) is None  # no body: 200 says it all
    assert mapped(200, answer([UID])) is None
    assert mapped(202, answer([UID], {"9.9": 0xA900})) is None  # another instance failed, not ours
    assert mapped(204) is None


def test_failure_answers_follow_the_c_store_statuses() -> None:
    cases: list[tuple[int, bytes, bool]] = [
        (202, answer(["9.9"], {UID: 0xA900}), True),  # data set does not match SOP class
        (202, answer([], {UID: 0x0122}), True),  # SOP class not supported
        (202, answer([], {UID: 0xC000}), True),  # cannot understand
        (202, answer([], {UID: 0xA700}), False),  # out of resources: may pass
        (202, answer([], {UID: 0x0110}), False),  # processing failure
        (202, answer([], {UID: None}), False),  # no reason given
        (202, b"<not json>", False),  # 202 without our instance among the stored
        (200, answer([], {UID: 0xC000}), True),  # a 200 that lists it as failed is believed
        (409, answer([], {UID: 0xA900}), True),
        (409, answer([], {UID: 0xA700}), False),
        (409, b"", True),
        (400, b"", True),
        (401, b"", True),
        (403, b"", True),
        (404, b"", True),
        (413, b"", True),
        (415, b"", True),
        (301, b"", True),
        (408, b"", False),
        (429, b"", False),
        (500, b"", False),
        (502, b"", False),
        (503, b"", False),
    ]
    for status, body, permanent in cases:
        error = mapped(status, body)
        assert error is not None, status
        assert error.permanent is permanent, (status, body, str(error))
        assert UID not in str(error)  # no instance named: the row knows which one it is


def test_retry_after_is_honoured() -> None:
    error = mapped(429, **{"Retry-After": "120"})
    assert isinstance(error, RetryLater) and error.retry_after == 120 and not error.permanent
    error = mapped(503, **{"Retry-After": "999999"})
    assert isinstance(error, RetryLater) and error.retry_after == 3600  # at most the backoff's cap
    assert not isinstance(mapped(503), RetryLater)
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now
    assert retry_after("soon") is None


def test_a_retry_after_longer_than_the_backoff_sets_the_countdown(runtime: Runtime, tmp_path: Path) -> None:
    """Through the outbox, against a real HTTP server that answers 429 with Retry-After."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Busy(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self.send_response(429)
            self.send_header("Retry-After", "300")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Busy) as httpd:
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{httpd.server_address[1]}/dicom-web"
        did, _ = stored_delivery(runtime, tmp_path, url, seed=1)
        assert send_delivery(did, runtime=runtime) == ("retrying", 300.0)
        httpd.shutdown()
    d = get_row(runtime, Delivery, did)
    assert d.state == DeliveryState.RETRYING and "HTTP 429" in (d.last_error or "")
    # the row agrees: the recovery sweep does not send it again before the server's time
    from datetime import UTC, datetime

    assert d.next_attempt_at is not None
    due_in = d.next_attempt_at.replace(tzinfo=None) - datetime.now(UTC).replace(tzinfo=None)
    assert 280 < due_in.total_seconds() <= 300


def test_store_answer_reads_dicom_json() -> None:
    stored, failed = store_answer(answer(["1.2"], {"1.3": 0xA700, "1.4": None}))
    assert stored == {"1.2"} and failed == {"1.3": 0xA700, "1.4": None}
    assert store_answer(b"[" + answer(["1.2"]) + b"]")[0] == {"1.2"}
    assert store_answer(b"nonsense") == (set(), {})
    assert store_answer(b'{"00081199": {"vr": "SQ", "Value": "x"}}') == (set(), {})
