"""The two pynetdicom internals the SCP replaces, in one place, each checked before it is used.

pynetdicom's public API streams a C-STORE data set to disk (``STORE_RECV_CHUNKED_DATASET``, then
``event.dataset_path``), but into the system temp dir (a copy, not a rename, when that is another
filesystem), without hashing while receiving and without a size cap (a huge object fills the temp
dir before it can be refused), and it reads the socket 4 KiB at a time. In ``bench/ingest.py``
(3 repeats, 100-frame cines, temp dir on the storage filesystem, the public path's best case) it
reached 0.71 (mono raw), 0.81 (RGB raw) and 0.81 (JPEG) of the adapter's throughput on one
association, and 0.94-1.10 (noise) on ten. So at SCP start :func:`install` replaces

1. ``pynetdicom.dimse_messages.NamedTemporaryFile``, the factory of the file each data set
   streams into, with a :class:`SinkFactory` that closes over the object store's ``tmp/`` and the
   size limit. Its :class:`IncomingObject`

   * is created in the object store's ``tmp/`` (same filesystem, so adoption is one rename),
   * computes SHA-256 and the size while the bytes arrive, so storing never re-reads the object,
   * stops writing once ``max_object_bytes`` is exceeded (the handler then answers 0xA700)
     instead of filling the disk with an object we will refuse anyway,
   * never raises into pynetdicom's reader thread: a write error (ENOSPC) is remembered and
     turned into a DIMSE status by the handler, the association stays healthy;

2. ``AssociationSocket.recv`` with :func:`recv_exact` (one ``recv_into`` per kernel buffer).

Each replacement is installed only when :func:`factory_mismatches` / :func:`recv_mismatches`
find pynetdicom's code shaped as the adapter expects (the factory call and every attribute used
on its result, the ``recv`` signature and its callers). Otherwise :func:`install` logs one
warning and leaves pynetdicom's own: the data set then arrives through the public API and the
store handler moves, size-checks and hashes it afterwards (slower, same DIMSE answers).
``tests/service/receive/test_pynetdicom_adapter.py`` pins this contract and runs both paths.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import inspect
import logging
import os
import queue
import re
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pynetdicom import dimse_messages
from pynetdicom.dul import DULServiceProvider
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.transport import AssociationSocket

from service.core.logs import ctx

log = logging.getLogger(__name__)

# Overlap SHA-256 with receiving when a core is free (about a quarter of the receive thread's
# work); on a saturated host an A/B in bench conditions was within noise.
HASH_IN_THREAD = True
_MAX_PENDING = 128  # fragments (16 MiB at a 128 KiB PDU) waiting for the hashing thread
_WRITEBACK_EVERY = 2 << 20  # start write-back of each 2 MiB received (see _start_writeback)


def _load_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc ``sync_file_range`` (Linux), or None where it does not exist."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], fn)


_sync_file_range = _load_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


class IncomingObject:
    """One data set being received; file-like enough for pynetdicom (see ``_FILE_USES``)."""

    def __init__(self, directory: Path, limit: int) -> None:
        self.limit = limit
        self.size = 0
        self.oversize = False
        self.error: OSError | None = None
        self._fd: int | None = None
        self.name = ""
        try:
            self._fd, self.name = tempfile.mkstemp(dir=directory, suffix=".part")
        except OSError as exc:  # disk full or storage gone: the handler answers, the stream is dropped
            self.error = exc
        self._sha = hashlib.sha256()
        self._lock = threading.Lock()  # close() from a connection-closed handler vs. the reader thread
        self.file = self  # pynetdicom calls ``_data_set_file.file.flush()`` after every fragment
        # SHA-256 runs in a helper thread (hashlib releases the GIL), overlapping the network reads;
        # at most _MAX_PENDING fragments wait for it, beyond that the writer hashes inline.
        self._writeback_from = 0
        self._pending: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._hasher: threading.Thread | None = None

    # -- the file protocol pynetdicom uses ------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        with self._lock:
            self.size += n
            if self.oversize or self.error is not None or self._fd is None:
                return n
            if self.size > self.limit:
                # Refused anyway: free the space now and drop the rest of the stream.
                self.oversize = True
                self._truncate()
                return n
            self._hash(bytes(data))
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
                self._start_writeback()
            except OSError as exc:  # ENOSPC, EIO: answered by the handler, never raised into the DUL thread
                self.error = exc
                self._truncate()
        return n

    def _start_writeback(self) -> None:
        """Ask the kernel to start writing what arrived so far, without waiting for it.

        The fsync before Success then only waits for the last few MiB: measured on this host
        it went from ~33 ms to ~4 ms for a 48 MB object, and from ~10 ms to ~5 ms for 12 MB.
        """
        if _sync_file_range is None or self._fd is None:
            return
        end = self.size
        if end - self._writeback_from >= _WRITEBACK_EVERY:
            _sync_file_range(
                self._fd, self._writeback_from, end - self._writeback_from, _SYNC_FILE_RANGE_WRITE
            )
            self._writeback_from = end

    def flush(self) -> None:
        """Writes are unbuffered ``os.write`` calls; nothing to flush."""

    def close(self) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    # -- what the store handler needs -----------------------------------------------------
    @property
    def sha256(self) -> str:
        """The digest of everything written; waits for the hashing thread to catch up."""
        if self._hasher is not None:
            self._pending.put(None)
            self._hasher.join()
            self._hasher = None
        return self._sha.hexdigest()

    def _hash(self, data: bytes) -> None:
        if (not HASH_IN_THREAD or len(data) < 65536) and self._hasher is None:
            self._sha.update(data)  # small fragments: a thread hand-off costs more than it saves
            return
        if self._hasher is None:
            self._hasher = threading.Thread(target=self._hash_loop, name="lusai-sha256", daemon=True)
            self._hasher.start()
        if self._pending.qsize() >= _MAX_PENDING:  # the hasher is starved of CPU: do not buffer the object
            self.sha256  # noqa: B018  (drains the queue and joins)
            self._sha.update(data)
            return
        self._pending.put(data)

    def _hash_loop(self) -> None:
        while (chunk := self._pending.get()) is not None:
            self._sha.update(chunk)

    def sync(self) -> None:
        """fsync before we answer Success: an acknowledged object must survive a power cut."""
        if self._fd is not None:
            os.fsync(self._fd)

    def discard(self) -> None:
        if self._hasher is not None:
            self._pending.put(None)
        self.close()
        if self.name:
            Path(self.name).unlink(missing_ok=True)
            self.name = ""  # pynetdicom unlinks ``name`` again later; the path may be reused by then

    def _truncate(self) -> None:
        try:
            if self._fd is not None:
                os.ftruncate(self._fd, 0)
        except OSError:
            pass


@dataclass(frozen=True)
class SinkFactory:
    """Stands in for ``tempfile.NamedTemporaryFile`` in ``pynetdicom.dimse_messages``.

    pynetdicom calls it once per received C-STORE data set; the arguments it passes (``mode``,
    ``suffix``, ``delete=False``) describe a file this sink already is.
    """

    directory: Path
    limit: int

    def __call__(self, *_args: Any, **_kwargs: Any) -> IncomingObject:
        return IncomingObject(self.directory, self.limit)


def recv_exact(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """``AssociationSocket.recv`` with one ``recv_into`` per kernel buffer instead of 4 KiB reads.

    pynetdicom reads a PDU in 4 KiB ``recv`` calls, each extending a bytearray: 32 syscalls and
    Python loop turns per 128 KiB PDU, the largest cost of receiving a raw cine after SHA-256.
    Same contract: exactly ``nr_bytes``, or fewer when the peer closed the connection; socket
    errors and timeouts propagate as before (the DUL turns them into Evt17).
    """
    sock = cast(Any, self.socket)  # a socket.socket or ssl.SSLSocket; both have recv_into
    buf = bytearray(nr_bytes)
    got = 0
    with memoryview(buf) as view:
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                break
            got += n
    if got < nr_bytes:
        del buf[got:]
    return buf


# -- the contract with pynetdicom (3.0.x; unchanged in 3.1.0.dev0) ---------------------------------
_FACTORY_CALL = 'NamedTemporaryFile(delete=False, mode="wb", suffix=".dcm")'
# What pynetdicom does with the file: the DIMSE message writes and flushes it and takes its name,
# hands it to the C-STORE request as ``_dataset_file`` (how the handler finds it), and the
# storage service closes it and unlinks ``name`` (best effort) after the handler returned.
_FILE_USES = {".name", ".write", ".file.flush"}
_HANDOVER = "primitive._dataset_file = self._data_set_file"
_CLEANUP_USES = {".close", ".name"}
_CLEANUP_UNLINK = "os.unlink(req._dataset_file.name)"
_PYNETDICOM_RECV = AssociationSocket.__dict__["recv"]


@dataclass(frozen=True)
class ReceivePath:
    """Which of the two replacements is active in this process."""

    sink: bool  # data sets stream into IncomingObject; False: pynetdicom's temp file (public API)
    fast_recv: bool


def _source(obj: object) -> str:
    try:
        return inspect.getsource(obj)  # type: ignore[arg-type]
    except (OSError, TypeError):  # no source shipped: treat as changed
        return ""


def _uses(source: str, name: str) -> set[str]:
    return set(re.findall(rf"{name}((?:\.\w+)+)", source))


def factory_mismatches() -> list[str]:
    """How pynetdicom's streamed-receive code differs from what :class:`IncomingObject` implements."""
    problems = []
    current = getattr(dimse_messages, "NamedTemporaryFile", None)
    if current is not tempfile.NamedTemporaryFile and not isinstance(current, SinkFactory):
        problems.append("dimse_messages.NamedTemporaryFile is not tempfile.NamedTemporaryFile")
    messages = _source(dimse_messages)
    decode = _source(getattr(getattr(dimse_messages, "DIMSEMessage", None), "decode_msg", None))
    if _FACTORY_CALL not in decode:
        problems.append(f"DIMSEMessage.decode_msg does not call {_FACTORY_CALL}")
    if not _uses(messages, "_data_set_file") <= _FILE_USES:
        extra = sorted(_uses(messages, "_data_set_file") - _FILE_USES)
        problems.append(f"dimse_messages uses _data_set_file{extra}")
    if _HANDOVER not in messages:
        problems.append("the C-STORE request no longer carries _dataset_file")
    cleanup = _source(getattr(StorageServiceClass, "SCP", None))
    if _CLEANUP_UNLINK not in cleanup or not _uses(cleanup, "_dataset_file") <= _CLEANUP_USES:
        problems.append("StorageServiceClass.SCP cleans up _dataset_file differently")
    return problems


def recv_mismatches() -> list[str]:
    """How pynetdicom's socket reads differ from what :func:`recv_exact` implements."""
    recv = AssociationSocket.__dict__.get("recv")
    if recv is None or recv not in (_PYNETDICOM_RECV, recv_exact):
        return ["AssociationSocket.recv is missing or replaced by someone else"]
    problems = []
    params = list(inspect.signature(_PYNETDICOM_RECV).parameters)
    if params != ["self", "nr_bytes"]:
        problems.append(f"AssociationSocket.recv takes {params}")
    calls = re.findall(r"\.socket\.recv\(([^()]*)\)", _source(DULServiceProvider))
    if not calls or any("," in args or not args.strip() for args in calls):
        problems.append(f"the DUL calls socket.recv({'; '.join(calls) or 'nowhere'})")
    return problems


def install(tmp_dir: Path, max_object_bytes: int, *, enabled: bool = True) -> ReceivePath:
    """Route this process's received data sets through the adapter; call once at SCP start.

    Each replacement is installed only when its internals have the expected shape; otherwise
    (and with ``enabled=False``, which tests use) pynetdicom's own are (re)instated and the
    store handler takes the data set through the public API. The replacements are process-wide
    (pynetdicom looks them up as module and class attributes), so the last call wins: one SCP
    per process.
    """
    uninstall()
    if not enabled:
        return ReceivePath(sink=False, fast_recv=False)
    factory_problems, recv_problems = factory_mismatches(), recv_mismatches()
    if factory_problems or recv_problems:
        log.warning(
            "pynetdicom internals changed: receiving partly through its public API (slower)",
            extra=ctx(pynetdicom=pynetdicom.__version__, changed="; ".join(factory_problems + recv_problems)),
        )
    if not factory_problems:
        dimse_messages.NamedTemporaryFile = SinkFactory(Path(tmp_dir), max_object_bytes)  # type: ignore[assignment]
    if not recv_problems:
        AssociationSocket.recv = recv_exact  # type: ignore[method-assign]
    return ReceivePath(sink=not factory_problems, fast_recv=not recv_problems)


def uninstall() -> None:
    """Give pynetdicom its own temp-file factory and socket read back (the public path)."""
    if isinstance(getattr(dimse_messages, "NamedTemporaryFile", None), SinkFactory):
        dimse_messages.NamedTemporaryFile = tempfile.NamedTemporaryFile
    if AssociationSocket.__dict__.get("recv") is recv_exact:
        AssociationSocket.recv = _PYNETDICOM_RECV  # type: ignore[method-assign]


def incoming_of(request: Any) -> IncomingObject | None:
    """The sink a C-STORE request was streamed into, or None on the public path."""
    sink = getattr(request, "_dataset_file", None)
    return sink if isinstance(sink, IncomingObject) else None


def discard_partial(assoc: Any) -> None:
    """Remove the half-received object of an aborted or dropped association.

    Best effort on either path: pynetdicom creates its own temporary file with ``delete=False``
    and would otherwise leave it in the temp dir. When the attributes are not there (a changed
    pynetdicom), there is nothing this can do and it does nothing.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    sink = getattr(message, "_data_set_file", None)
    if isinstance(sink, IncomingObject):
        sink.discard()
        return
    path = getattr(message, "_data_set_path", None)
    if sink is not None and isinstance(path, Path):
        path.unlink(missing_ok=True)
