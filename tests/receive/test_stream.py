"""The hashing, size-capped sink pynetdicom streams into (no network needed)."""

from __future__ import annotations

import hashlib
import os
import socket
import threading
from pathlib import Path

import pytest

from service.receive import stream


@pytest.mark.parametrize(("threaded", "max_pending"), [(False, 128), (True, 128), (True, 2)])
def test_digest_and_bytes_match_what_was_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threaded: bool, max_pending: int
) -> None:
    monkeypatch.setattr(stream, "HASH_IN_THREAD", threaded)
    monkeypatch.setattr(stream, "_MAX_PENDING", max_pending)  # 2: exercises the backpressure path
    chunks = [os.urandom(n) for n in (132, 131060, 70000, 131060, 5, 131060, 131060, 99999)]
    sink = stream.IncomingObject(tmp_path, limit=10**9)
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
    sink = stream.IncomingObject(tmp_path, limit=1000)
    sink.write(b"a" * 800)
    sink.write(b"b" * 800)
    sink.write(b"c" * 800)
    assert sink.oversize and sink.size == 2400
    assert Path(sink.name).stat().st_size == 0
    sink.discard()
    assert list(tmp_path.iterdir()) == [] and sink.name == ""


def test_unwritable_directory_is_reported_not_raised(tmp_path: Path) -> None:
    sink = stream.IncomingObject(tmp_path / "missing", limit=1000)
    assert sink.write(b"x" * 10) == 10  # pynetdicom's reader thread must never see an exception
    assert isinstance(sink.error, OSError)
    sink.discard()


def test_in_process_scp_restores_process_globals(tmp_path: Path) -> None:
    """Other test modules in the same session must see pynetdicom/pydicom defaults again."""
    import logging
    import warnings

    import pydicom.config
    from pynetdicom import _config, dimse_messages
    from pynetdicom.transport import AssociationSocket

    from .conftest import inprocess_scp

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
        assert snapshot() != before  # make_server really changes them ...
    assert snapshot() == before  # ... and the fixture puts them back


class _Holder:
    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock


def test_fast_recv_reads_exactly_and_stops_at_close() -> None:
    from service.receive.scp import _recv_exact

    a, b = socket.socketpair()
    payload = os.urandom(300_000)

    def feed() -> None:
        for i in range(0, len(payload), 7000):  # many small segments, as a slow sender would
            a.sendall(payload[i : i + 7000])
        a.close()

    t = threading.Thread(target=feed)
    t.start()
    holder = _Holder(b)
    assert _recv_exact(holder, 131072) == payload[:131072]  # type: ignore[arg-type]
    assert _recv_exact(holder, 131072) == payload[131072:262144]  # type: ignore[arg-type]
    rest = _recv_exact(holder, 131072)  # type: ignore[arg-type]
    assert rest == payload[262144:] and isinstance(rest, bytearray)  # closed early: what there was
    t.join()
    b.close()
