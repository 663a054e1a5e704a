"""Association policy: calling-AE allow-list, loopback-only default, DICOM TLS, association limit."""

from __future__ import annotations

import logging
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE

from service.core.settings import Settings
from service.receive.scp import ReusePortServer
from tests.conftest import free_port, which
from tests.factories import cine, save
from tests.service.receive.conftest import Running, echo, send, storescu

pytestmark = pytest.mark.network

SUCCESS = 0x0000


def test_unknown_calling_ae_is_rejected_at_association(scp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(LUSAI_ALLOWED_CALLING_AES="US_ROOM1, PACS")
    assert echo(scp.port, ae_title="US_ROOM1") == SUCCESS
    assert echo(scp.port, ae_title="INTRUDER") is None
    with pytest.raises(ConnectionRefusedError):
        send(scp.port, [cine("raw", frames=2)], ae_title="INTRUDER")
    assert send(scp.port, [cine("raw", frames=2)], ae_title="PACS") == [SUCCESS]
    assert [i.calling_ae for i in scp.instances()] == ["PACS"]


def test_storescu_sees_the_rejection(scp_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(LUSAI_ALLOWED_CALLING_AES="PACS")
    out = storescu(scp.port, save(cine("raw", frames=2), tmp_path / "a.dcm"), ae_title="INTRUDER")
    assert "Association Rejected" in out
    assert "Calling AE Title Not Recognized" in out


def test_default_admits_loopback_only(tmp_path: Path) -> None:
    """No allow-list configured: connections from other hosts are closed before any PDU."""
    settings = Settings(data_dir=tmp_path)
    assert settings.allowed_calling_aes == []
    server = ReusePortServer.__new__(ReusePortServer)
    server.settings = settings
    assert server.verify_request(None, ("127.0.0.1", 4000))
    assert server.verify_request(None, ("::1", 4000, 0, 0))
    assert not server.verify_request(None, ("10.1.2.3", 4000))
    assert not server.verify_request(None, ("::ffff:10.1.2.3", 4000, 0, 0))
    listed = Settings(data_dir=tmp_path, allowed_calling_aes="PACS")  # type: ignore[arg-type]
    server.settings = listed
    assert server.verify_request(None, ("10.1.2.3", 4000))  # then the AE title decides


def test_association_limit(scp_factory) -> None:  # type: ignore[no-untyped-def]
    scp = scp_factory(LUSAI_MAX_ASSOCIATIONS="1")
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", scp.port, ae_title="LUSAI")
    assert held.is_established
    try:
        assert echo(scp.port) is None  # A-ASSOCIATE-RJ: local limit exceeded
    finally:
        held.release()
    deadline = time.monotonic() + 10  # the released association's thread ends shortly after
    while echo(scp.port) != SUCCESS:
        assert time.monotonic() < deadline
        time.sleep(0.1)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    openssl = which("openssl")
    d = tmp_path_factory.mktemp("tls")
    out = {}
    for name in ("server", "client"):
        subprocess.run(
            [
                openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-days", "1", "-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1",
                "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem"),
            ],
            check=True,
            capture_output=True,
        )  # fmt: skip
        out[name] = d / f"{name}.pem"
        out[f"{name}_key"] = d / f"{name}.key"
    return out


def _client_context(certs: dict[str, Path], with_cert: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs["server"]))
    ctx.check_hostname = False
    if with_cert:
        ctx.load_cert_chain(str(certs["client"]), str(certs["client_key"]))
    return ctx


def test_tls_store(scp_factory, certs: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    scp: Running = scp_factory(
        LUSAI_DICOM_TLS_CERT=str(certs["server"]), LUSAI_DICOM_TLS_KEY=str(certs["server_key"])
    )
    assert send(scp.port, [cine("raw", frames=2)], ssl_context=_client_context(certs, False)) == [SUCCESS]
    assert len(scp.instances()) == 1
    assert echo(scp.port) is None  # plain DICOM on the TLS port gets nowhere


def test_mutual_tls_requires_client_certificate(scp_factory, certs: dict[str, Path]) -> None:  # type: ignore[no-untyped-def]
    scp: Running = scp_factory(
        LUSAI_DICOM_TLS_CERT=str(certs["server"]),
        LUSAI_DICOM_TLS_KEY=str(certs["server_key"]),
        LUSAI_DICOM_TLS_CA=str(certs["client"]),
    )
    assert send(scp.port, [cine("raw", frames=2)], ssl_context=_client_context(certs, True)) == [SUCCESS]
    with pytest.raises((ConnectionRefusedError, ssl.SSLError, OSError)):
        send(scp.port, [cine("raw", frames=2)], ssl_context=_client_context(certs, False))
    assert len(scp.instances()) == 1


def test_many_concurrent_associations(scp: Running) -> None:
    results: list[list[int | None]] = []
    lock = threading.Lock()

    def worker(i: int) -> None:
        r = send(scp.port, [cine("raw", frames=3, seed=i) for _ in range(2)], ae_title=f"SCU{i}")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(map(tuple, results)) == [(SUCCESS, SUCCESS)] * 8
    assert len(scp.instances()) == 16 and len(scp.queued_job_ids()) == 16


def test_no_patient_data_or_uids_in_logs(
    scp: Running, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """Accepted, refused and ignored objects alike: names, IDs and UIDs never reach a log record."""
    caplog.set_level(logging.DEBUG)
    good = cine("raw", frames=2)
    bad = cine("raw", frames=2)
    bad.NumberOfFrames = 3  # refused 0xA900
    other = cine("raw", frames=2, modality="OT")  # ignored
    assert send(scp.port, [good, bad, other]) == [SUCCESS, 0xA900, SUCCESS]
    text = "\n".join(f"{r.getMessage()} {getattr(r, 'ctx', '')} {r.args}" for r in caplog.records)
    assert "object received" in text and "object refused" in text  # the records were captured
    for ds in (good, bad, other):
        for value in (
            ds.PatientID,
            str(ds.PatientName),
            ds.SOPInstanceUID,
            ds.StudyInstanceUID,
            ds.AccessionNumber,
        ):
            assert value not in text


@pytest.mark.parametrize("tls", [False, True])
def test_the_health_check_passes_the_scp_s_own_policy(  # type: ignore[no-untyped-def]
    scp_factory, certs: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tls: bool
) -> None:
    """`lusai check scp` (compose and Kubernetes probes) with an allow-list that does not name
    lusai's own AE title, and on a TLS-only port: found failing while writing deploy/k8s."""
    from typer.testing import CliRunner

    from service.cli import app

    env = {"LUSAI_ALLOWED_CALLING_AES": "ORTHANC"}
    if tls:
        env |= {"LUSAI_DICOM_TLS_CERT": str(certs["server"]), "LUSAI_DICOM_TLS_KEY": str(certs["server_key"])}
    scp: Running = scp_factory(**env)
    for key, value in (env | {"LUSAI_DICOM_PORT": str(scp.port)}).items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(app, ["check", "scp"])
    assert result.exit_code == 0, result.output
    monkeypatch.setenv("LUSAI_DICOM_PORT", str(free_port()))  # nothing listens: unhealthy
    assert CliRunner().invoke(app, ["check", "scp"]).exit_code == 1
