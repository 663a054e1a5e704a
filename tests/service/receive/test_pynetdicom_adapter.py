"""The receive adapter: its sink and socket read, the contract with pynetdicom, and both paths.

A C-STORE runs through the adapter and through pynetdicom's public API (the fallback a changed
pynetdicom gets), with the same DIMSE answers and the same stored bytes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import _config, dimse_messages
from pynetdicom.transport import AssociationSocket

from service.core.runtime import Runtime
from service.core.settings import Settings
from service.receive import handlers, pynetdicom_adapter
from service.receive.pynetdicom_adapter import SinkFactory, recv_exact
from tests.factories import cine, save
from tests.service.receive.conftest import Running, inprocess_scp, send, send_then_drop

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700


# -- the sink (no network) ------------------------------------------------------------------------
@pytest.mark.parametrize(("threaded", "max_pending"), [(False, 128), (True, 128), (True, 2)])
def test_digest_and_bytes_match_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: bool, max_pending: int
) -> None:
    monkeypatch.setattr(pynetdicom_adapter, "HASH_IN_THREAD", threaded)
    monkeypatch.setattr(pynetdicom_adapter, "_MAX_PENDING", max_pending)  # 2: the backpressure path
    chunks = [os.urandom(n) for n in (132, 131060, 70000, 131060, 5, 131060, 131060, 99999)]
    sink = pynetdicom_adapter.IncomingObject(tmp_path, limit=10**9)
    for c in chunks:
        assert sink.write(c) == len(c)
        sink.file.flush()
    sink.sync()
    digest = sink.sha256
    sink.close()
    data = b"".join(chunks)
    assert digest == hashlib.sha256(data).hexdigest()
    assert Path(sink.name).read_bytes() == data and sink.size == len(data)


def test_over_limit_stops_writing_and_frees_space(tmp_path: Path) -> None:
    sink = pynetdicom_adapter.IncomingObject(tmp_path, limit=1000)
    sink.write(b"a" * 800)
    sink.write(b"b" * 800)
    sink.write(b"c" * 800)
    assert sink.oversize and sink.size == 2400
    assert Path(sink.name).stat().st_size == 0
    sink.discard()
    assert list(tmp_path.iterdir()) == [] and sink.name == ""


def test_unwritable_directory_is_reported_not_raised(tmp_path: Path) -> None:
    sink = pynetdicom_adapter.IncomingObject(tmp_path / "missing", limit=1000)
    assert sink.write(b"x" * 10) == 10  # pynetdicom's reader thread must never see an exception
    assert isinstance(sink.error, OSError)
    sink.discard()


def test_factory_closes_over_its_store_and_limit(tmp_path: Path) -> None:
    """Called as pynetdicom calls NamedTemporaryFile; each call is a new sink in that directory."""
    factory = SinkFactory(tmp_path, 1000)
    a = factory(delete=False, mode="wb", suffix=".dcm")
    b = factory(delete=False, mode="wb", suffix=".dcm")
    assert a is not b and a.limit == 1000 and Path(a.name).parent == tmp_path
    for sink in (a, b):
        sink.discard()


class _Holder:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_fast_recv_reads_exactly_and_stops_at_close() -> None:
    a, b = socket.socketpair()
    payload = os.urandom(300_000)

    def feed() -> None:
        for i in range(0, len(payload), 7000):  # many small segments, as a slow sender would
            a.sendall(payload[i : i + 7000])
        a.close()

    t = threading.Thread(target=feed)
    t.start()
    holder = _Holder(b)
    assert recv_exact(holder, 131072) == payload[:131072]  # type: ignore[arg-type]
    assert recv_exact(holder, 131072) == payload[131072:262144]  # type: ignore[arg-type]
    rest = recv_exact(holder, 131072)  # type: ignore[arg-type]
    assert rest == payload[262144:] and isinstance(rest, bytearray)  # closed early: what there was
    t.join()
    b.close()


# -- the contract with pynetdicom -----------------------------------------------------------------
def test_installed_pynetdicom_matches_what_the_adapter_implements() -> None:
    """Fails on a pynetdicom upgrade that changed the internals: the SCP would still work (it falls
    back, with a warning), but slower; re-read dimse_messages/transport and adjust the adapter."""
    assert pynetdicom_adapter.factory_mismatches() == []
    assert pynetdicom_adapter.recv_mismatches() == []


def test_the_checks_see_a_changed_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    original_decode = dimse_messages.DIMSEMessage.decode_msg
    original_recv = AssociationSocket.recv

    def decode_msg(self: Any, primitive: Any, assoc: Any = None) -> bool:  # streams some other way
        return original_decode(self, primitive, assoc)

    def recv(self: AssociationSocket, nr_bytes: int, flags: int = 0) -> bytearray:
        return original_recv(self, nr_bytes)

    monkeypatch.setattr(dimse_messages.DIMSEMessage, "decode_msg", decode_msg)
    assert any("decode_msg" in p for p in pynetdicom_adapter.factory_mismatches())
    monkeypatch.setattr(AssociationSocket, "recv", recv)
    assert pynetdicom_adapter.recv_mismatches() != []


@pytest.fixture
def restored_internals(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(dimse_messages, "NamedTemporaryFile", dimse_messages.NamedTemporaryFile)
    monkeypatch.setattr(AssociationSocket, "recv", AssociationSocket.recv)
    yield


@pytest.mark.usefixtures("restored_internals")
def test_install_and_uninstall(tmp_path: Path) -> None:
    path = pynetdicom_adapter.install(tmp_path, 1000)
    assert path == pynetdicom_adapter.ReceivePath(sink=True, fast_recv=True)
    assert dimse_messages.NamedTemporaryFile == SinkFactory(tmp_path, 1000)
    assert AssociationSocket.recv is recv_exact
    again = pynetdicom_adapter.install(tmp_path / "other", 5)  # the last call wins
    assert again.sink and dimse_messages.NamedTemporaryFile == SinkFactory(tmp_path / "other", 5)
    off = pynetdicom_adapter.install(tmp_path, 1000, enabled=False)
    assert off == pynetdicom_adapter.ReceivePath(sink=False, fast_recv=False)
    assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile
    assert AssociationSocket.recv is not recv_exact


@pytest.mark.usefixtures("restored_internals")
def test_changed_internals_are_left_alone_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(pynetdicom_adapter, "_FACTORY_CALL", "NamedTemporaryFile(delete=True)")
    caplog.set_level(logging.WARNING, logger=pynetdicom_adapter.__name__)
    path = pynetdicom_adapter.install(tmp_path, 1000)
    assert path == pynetdicom_adapter.ReceivePath(sink=False, fast_recv=True)
    assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile
    [record] = [r for r in caplog.records if r.name == pynetdicom_adapter.__name__]
    assert "public API" in record.getMessage() and "decode_msg" in record.ctx["changed"]  # type: ignore[attr-defined]


def test_make_server_needs_the_library_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from service.receive.scp import make_server

    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    with pytest.raises(RuntimeError, match="configure_libraries"):
        make_server(Runtime.from_settings(Settings(data_dir=tmp_path)))


# -- a C-STORE through each path ------------------------------------------------------------------
@pytest.fixture
def digests(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int] | None]:
    """The digest the store handler hands to ingest: known while receiving only on the adapter path."""
    seen: list[tuple[str, int] | None] = []
    real = handlers.ingest_file

    def spy(tmp: Path, **kwargs: Any) -> Any:
        seen.append(kwargs["digest"])
        return real(tmp, **kwargs)

    monkeypatch.setattr(handlers, "ingest_file", spy)
    return seen


@pytest.fixture
def system_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """pynetdicom's temp dir for this test; on another filesystem (tmpfs) where there is one."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path
    d = Path(tempfile.mkdtemp(prefix="lusai-test-", dir=base))
    monkeypatch.setattr(tempfile, "tempdir", str(d))
    yield d
    for f in d.iterdir():
        f.unlink()
    d.rmdir()


def _stored_as_sent(scp: Running, path: Path) -> None:
    [stored] = scp.stored_files()
    assert stored.read_bytes()[-1024:] == path.read_bytes()[-1024:]  # the pixel data, byte for byte
    assert stored.stem == hashlib.sha256(stored.read_bytes()).hexdigest()
    assert scp.temp_files() == []


@pytest.mark.network
def test_c_store_through_the_adapter(
    scp: Running, tmp_path: Path, digests: list[tuple[str, int] | None], system_tmp: Path
) -> None:
    assert isinstance(dimse_messages.NamedTemporaryFile, SinkFactory)
    assert AssociationSocket.recv is recv_exact
    path = save(cine("raw", frames=6), tmp_path / "a.dcm")
    assert send(scp.port, [path]) == [SUCCESS]
    [digest] = digests
    assert digest is not None  # hashed while receiving, in the store's tmp/
    _stored_as_sent(scp, path)
    assert digest == (scp.stored_files()[0].stem, scp.stored_files()[0].stat().st_size)
    assert list(system_tmp.iterdir()) == []


@pytest.mark.network
def test_c_store_through_the_public_api(
    tmp_path: Path, digests: list[tuple[str, int] | None], system_tmp: Path
) -> None:
    """The fallback: pynetdicom's own temp file, moved (copied across filesystems) and hashed."""
    with inprocess_scp(tmp_path / "data", stream_adapter=False, LUSAI_MAX_OBJECT_BYTES="40000") as scp:
        assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile
        assert AssociationSocket.recv is not recv_exact
        path = save(cine("raw", frames=2, rows=32, cols=32), tmp_path / "a.dcm")
        assert send(scp.port, [path]) == [SUCCESS]
        assert digests == [None]  # hashed on adoption
        _stored_as_sent(scp, path)
        assert send(scp.port, [cine("raw", frames=10)]) == [OUT_OF_RESOURCES]  # ~51 kB, after receipt
        assert len(scp.stored_files()) == 1 and len(scp.instances()) == 1
        send_then_drop(scp.port, save(cine("raw", frames=6), tmp_path / "b.dcm"), fraction=0.5)
        deadline = time.monotonic() + 10
        while list(system_tmp.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(system_tmp.iterdir()) == []  # nothing left behind in the temp dir either
        assert scp.temp_files() == []


@pytest.mark.network
def test_changed_pynetdicom_still_receives(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    digests: list[tuple[str, int] | None],
    system_tmp: Path,
) -> None:
    """An SCP started on a pynetdicom whose internals changed falls back by itself."""
    monkeypatch.setattr(pynetdicom_adapter, "_FACTORY_CALL", "NamedTemporaryFile(delete=True)")
    with inprocess_scp(tmp_path / "data") as scp:
        assert dimse_messages.NamedTemporaryFile is tempfile.NamedTemporaryFile
        path = save(cine("raw", frames=2), tmp_path / "a.dcm")
        assert send(scp.port, [path]) == [SUCCESS]
        assert digests == [None]
        _stored_as_sent(scp, path)


def test_in_process_scp_restores_process_globals(tmp_path: Path) -> None:
    """Other test modules in the same session must see pynetdicom/pydicom defaults again."""
    import warnings

    import pydicom.config

    def snapshot() -> tuple[object, ...]:
        return (
            _config.STORE_RECV_CHUNKED_DATASET,
            _config.LOG_REQUEST_IDENTIFIERS,
            dimse_messages.NamedTemporaryFile,
            AssociationSocket.recv,
            pydicom.config.settings.reading_validation_mode,
            logging.getLogger("pynetdicom").level,
            len(warnings.filters),
        )

    before = snapshot()
    with inprocess_scp(tmp_path / "d"):
        assert snapshot() != before  # configure_libraries() and the adapter really change them ...
    assert snapshot() == before  # ... and the fixture puts them back
