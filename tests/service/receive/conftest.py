"""Fixtures for the receive tests: an SCP on a free port with its own data dir, senders, inspectors.

The SCP runs in-process (fast, and lets a test inject a failing disk) or as a ``lusai scp``
subprocess (the real entry point). Each has SQLite + the embedded filesystem broker under a
temporary ``LUSAI_DATA_DIR``; queued Celery messages are read back from the broker folder.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom.config
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config, dimse_messages
from pynetdicom.transport import AssociationSocket
from sqlalchemy import select

from service.core import queue
from service.core.libraries import configure_libraries
from service.core.models import Instance, Job
from service.core.runtime import Runtime
from service.core.settings import Settings
from tests.conftest import OnRuntime, broker_messages, free_port, stop, which


@dataclass
class Running(OnRuntime):
    """One SCP under test and the state it writes, read through a runtime on the SCP's settings
    (the in-process SCP's own; for a subprocess, one built on the same environment)."""

    port: int

    def instances(self) -> list[Instance]:
        with self.runtime.db.session() as s:
            return list(s.scalars(select(Instance).order_by(Instance.id)))

    def jobs(self) -> list[Job]:
        with self.runtime.db.session() as s:
            return list(s.scalars(select(Job).order_by(Job.id)))

    def queued_job_ids(self) -> list[int]:
        """Job ids in Celery messages waiting in the embedded broker's folder."""
        return sorted(m.args[0] for m in broker_messages(self.settings) if m.task == queue.ANALYZE_TASK)

    def stored_files(self) -> list[Path]:
        return sorted((self.settings.storage / "objects").rglob("*.dcm"))

    def temp_files(self) -> list[Path]:
        return sorted(p for p in self.store.tmp_dir.iterdir() if p.is_file())

    def spooled(self) -> list[Path]:
        return sorted((self.settings.data_dir / "spool").glob("*.json"))


def _env(data_dir: Path, port: int, extra: dict[str, str]) -> dict[str, str]:
    env = {
        "LUSAI_DATA_DIR": str(data_dir),
        "LUSAI_DICOM_PORT": str(port),
        "LUSAI_DICOM_HOST": "127.0.0.1",
        "LUSAI_LOG_LEVEL": "WARNING",
    }
    env.update(extra)
    return env


@contextmanager
def inprocess_scp(data_dir: Path, *, stream_adapter: bool = True, **env_extra: str) -> Iterator[Running]:
    """Run the SCP in a thread of this process, configured through LUSAI_* like production: the
    settings are read from that environment, and the SCP gets a runtime of its own on them.

    ``stream_adapter=False`` receives through pynetdicom's public API only (the fallback path).
    """
    from service.core.models import Base
    from service.receive.scp import make_server

    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        for k in [k for k in os.environ if k.startswith("LUSAI_")]:
            mp.delenv(k)
        for k, v in _env(data_dir, port, env_extra).items():
            mp.setenv(k, v)
        _keep_process_globals(mp)
        levels = {name: logging.getLogger(name).level for name in ("pynetdicom", "pydicom", "multipart")}
        configure_libraries()  # what each entry point does at start-up
        settings = Settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        try:
            with Runtime.from_settings(settings) as runtime:
                if settings.db_url.startswith("sqlite"):
                    Base.metadata.create_all(runtime.db.engine)
                server = make_server(runtime, stream_adapter=stream_adapter)
                thread = threading.Thread(
                    target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
                )
                thread.start()
                try:
                    yield Running(runtime, port)
                finally:
                    # make_server() does not register with the AE, so skip pynetdicom's shutdown()
                    socketserver.TCPServer.shutdown(server)
                    server.server_close()
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _keep_process_globals(mp: pytest.MonkeyPatch) -> None:
    """configure_libraries() and the receive adapter that make_server() installs change pynetdicom,
    pydicom and logging for the whole process (right for an SCP process); undo that after each
    in-process SCP so other tests in this session see defaults."""
    for name in (
        "STORE_RECV_CHUNKED_DATASET",
        "STORE_SEND_CHUNKED_DATASET",
        "LOG_HANDLER_LEVEL",
        "LOG_REQUEST_IDENTIFIERS",
        "LOG_RESPONSE_IDENTIFIERS",
    ):
        mp.setattr(_config, name, getattr(_config, name))
    mp.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    mp.setattr(AssociationSocket, "recv", AssociationSocket.recv)
    mp.setattr(
        pydicom.config.settings, "reading_validation_mode", pydicom.config.settings.reading_validation_mode
    )
    mp.setattr(warnings, "filters", list(warnings.filters))


@pytest.fixture
def scp(tmp_path: Path) -> Iterator[Running]:
    """An in-process SCP with default settings (loopback senders only, reject other SOP classes)."""
    with inprocess_scp(tmp_path / "data") as running:
        yield running


@pytest.fixture
def scp_factory(tmp_path: Path) -> Iterator[Any]:
    """Start in-process SCPs with extra LUSAI_* settings: ``scp_factory(LUSAI_X="...")``;
    ``stream_adapter=False`` for pynetdicom's public receive path."""
    stack: list[Any] = []

    def start(*, stream_adapter: bool = True, **env: str) -> Running:
        cm = inprocess_scp(tmp_path / f"data{len(stack)}", stream_adapter=stream_adapter, **env)
        stack.append(cm)
        return cm.__enter__()

    yield start
    for cm in reversed(stack):
        cm.__exit__(None, None, None)


@contextmanager
def subprocess_scp(data_dir: Path, *args: str, **env_extra: str) -> Iterator[Running]:
    """``lusai scp`` as its own process, as operators run it."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUSAI_")}
    env.update(_env(data_dir, port, env_extra))
    data_dir.mkdir(parents=True, exist_ok=True)
    lusai = Path(sys.executable).parent / "lusai"
    log = open(data_dir / "scp.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([str(lusai), "scp", *args], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_echo(port, timeout=30, proc=proc)
        with pytest.MonkeyPatch.context() as mp:
            for k, v in _env(data_dir, port, env_extra).items():
                mp.setenv(k, v)
            settings = Settings()
        with Runtime.from_settings(settings) as runtime:
            yield Running(runtime, port)
    finally:
        stop(proc, timeout=10)
        log.close()


def wait_for_echo(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"SCP exited with {proc.returncode}")
        try:
            if echo(port) == 0:
                return
        except Exception:
            pass
        time.sleep(0.2)
    raise TimeoutError("SCP did not answer C-ECHO")


def echo(port: int, ae_title: str = "TESTSCU") -> int | None:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="LUSAI")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) if "Status" in status else None


def send(
    port: int,
    items: list[Dataset | Path],
    *,
    ae_title: str = "TESTSCU",
    ssl_context: Any = None,
) -> list[int | None]:
    """C-STORE each item on one association; a Path is streamed byte for byte (not re-encoded).

    Returns the DIMSE status per item (None when the association broke); raises if the
    association is refused.
    """
    ae = AE(ae_title=ae_title)
    ae.maximum_pdu_size = 131072
    contexts: set[tuple[str, str]] = set()
    for item in items:
        meta = item.file_meta if isinstance(item, Dataset) else _meta(item)
        contexts.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
    for sop, ts in sorted(contexts):
        ae.add_requested_context(sop, ts)
    tls = (ssl_context, "127.0.0.1") if ssl_context is not None else None
    assoc = ae.associate("127.0.0.1", port, ae_title="LUSAI", tls_args=tls)
    if not assoc.is_established:
        raise ConnectionRefusedError("association not established")
    out: list[int | None] = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # paths go out byte for byte, even broken ones
    try:
        for item in items:
            rsp = assoc.send_c_store(item)
            out.append(int(rsp.Status) if "Status" in rsp else None)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        if assoc.is_established:
            assoc.release()
    return out


def _meta(path: Path) -> Dataset:
    from pydicom.filereader import read_file_meta_info

    return read_file_meta_info(path)


def storescu(port: int, *paths: Path, ae_title: str = "STORESCU", extra: tuple[str, ...] = ()) -> str:
    """Send with DCMTK storescu; returns its combined output (status lines at -v)."""
    exe = which("storescu")
    proc = subprocess.run(
        [
            exe,
            "-v",
            "-R",
            "-aet",
            ae_title,
            "-aec",
            "LUSAI",
            *extra,
            "127.0.0.1",
            str(port),
            *map(str, paths),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return proc.stdout + proc.stderr


def send_then_drop(port: int, path: Path, fraction: float, *, ae_title: str = "TESTSCU") -> None:
    """Send a C-STORE whose data set stops after ``fraction`` of its bytes, then cut the TCP connection.

    This is what a sender crashing or a network failure mid-object looks like to the SCP.
    """
    from pydicom.filereader import read_file_meta_info
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.pdu import P_DATA_TF

    meta = read_file_meta_info(path)
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="LUSAI")
    assert assoc.is_established
    cx_id = assoc.accepted_contexts[0].context_id
    from pynetdicom.dsutils import split_dataset

    _, offset = split_dataset(path)
    body = path.read_bytes()[offset:]
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = meta.MediaStorageSOPClassUID
    req.AffectedSOPInstanceUID = meta.MediaStorageSOPInstanceUID
    req.Priority = 2
    req.DataSet = BytesIO(body[: int(len(body) * fraction)])
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    sock = assoc.dul.socket.socket  # type: ignore[union-attr]
    pdus = list(msg.encode_msg(cx_id, 16384))
    for primitive in pdus[:-1]:  # never send the last fragment: the data set stays incomplete
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        sock.sendall(pdu.encode())
    time.sleep(0.2)
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    assoc.dul.kill_dul()  # type: ignore[union-attr]
