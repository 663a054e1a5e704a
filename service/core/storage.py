"""Content-addressed object storage: the interface, and the filesystem store behind it.

Keys are ``objects/<sha[:2]>/<sha[2:4]>/<sha>.<suffix>`` (:func:`key_for`), derived only from the
bytes and the kind of object (DICOM, or a preview image rendered by the worker), never from a UID
or any other sender-controlled string, so a hostile UID cannot steer a path and identical sends
deduplicate for free. The scheme belongs to no implementation: every store names an object the
same way, so the keys in the database stay valid whichever store holds the bytes.

:class:`ObjectStore` is what the rest of lusai uses (``Runtime.store``); :class:`FilesystemStore`
is the one implementation: a folder, local or a shared filesystem mounted at the same path on every
host (NFSv4.1+, an RWX volume; what it relies on there is in the class's docstring and in
docs/deployment.md, "Storage across hosts"). Writes go to a temporary file in the same
filesystem, are fsynced, renamed into place and the rename made durable by fsyncing the
directories, so a reader never sees half an object and a crash after ``adopt`` returns cannot lose
one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

#: Suffix of each kind of stored object -> its media type: DICOM objects (received and produced)
#: and the preview images the worker renders next to the SEG. The suffix is chosen by our code,
#: never by a sender.
MEDIA_TYPES: dict[str, str] = {
    "dcm": "application/dicom",
    "png": "image/png",
    "gif": "image/gif",
    "webp": "image/webp",
}
# Both are used with fullmatch: "$" would also match before a trailing newline.
_KEY_RE = re.compile(
    rf"objects/([0-9a-f]{{2}})/([0-9a-f]{{2}})/\1\2[0-9a-f]{{60}}\.(?:{'|'.join(MEDIA_TYPES)})"
)
_SHA_RE = re.compile(r"[0-9a-f]{64}")
CHUNK = 1 << 20


class StorageFull(OSError):
    """No space left for an incoming object (maps to DIMSE 0xA700)."""


#: errno values that mean "no room": the host's condition, not the object's.
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


STORAGE_DOWN = frozenset({errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.EROFS})
"""What a shared mount that went away (or a disk remounted read-only after errors) answers."""


def storage_unavailable(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says the storage cannot be used now: the NFS/RWX mount
    gone or stale, the filesystem read-only. Like a full disk, the host's failure, not the job's
    (:func:`service.core.lifecycle.retry_when_space`): a long NFS outage must not fail jobs for good."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in STORAGE_DOWN:
            return True
        current = current.__cause__ or current.__context__
    return False


def storage_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a disk is full: the storage's, or SQLite's file's.

    A job that fails this way is not at fault and is retried once there is room
    (:func:`service.core.lifecycle.retry_when_space`).
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, StorageFull) or (isinstance(current, OSError) and current.errno in NO_SPACE):
            return True
        if getattr(current, "sqlite_errorcode", None) == 13:  # SQLITE_FULL: database or disk is full
            return True
        current = current.__cause__ or current.__context__ or getattr(current, "orig", None)
    return False


def suffix_of(key: str) -> str:
    """The kind of a stored object (``"dcm"``, ``"png"`` ...), from its key."""
    return key.rsplit(".", 1)[-1]


def key_for(sha256: str, suffix: str = "dcm") -> str:
    """The key of the object with these bytes (their SHA-256, lower-case hex) and of this kind.

    The one key scheme, shared by every :class:`ObjectStore` implementation.
    """
    if not _SHA_RE.fullmatch(sha256) or suffix not in MEDIA_TYPES:
        raise ValueError("not a SHA-256 digest and object kind")
    return f"objects/{sha256[:2]}/{sha256[2:4]}/{sha256}.{suffix}"


def check_key(key: str) -> str:
    """``key`` if it is one :func:`key_for` makes; ValueError for anything else (``../``, a UID)."""
    if not _KEY_RE.fullmatch(key):
        raise ValueError("not a storage key")
    return key


class ObjectStore(Protocol):
    """Where lusai keeps objects by content: what the SCP, the API and the workers use.

    Each member is here because a caller needs it whatever holds the bytes:

    - ``tmp_dir``: the local staging folder of this host. :meth:`new_temp` makes its files there,
      the SCP's streaming receiver (``service/receive/pynetdicom_adapter.py``) writes incoming
      data sets into it directly, and the recovery sweep removes what a killed writer left in it
      (``service/core/recovery.py::remove_stale_temp_files``). Whatever is in it is not stored.
    - :meth:`new_temp` + :meth:`adopt`: the two-phase write. A caller fills a temporary file at its
      own pace (a C-STORE stream, an upload, a STOW-RS part, hashing and fsyncing as the bytes
      arrive), checks it, and only then makes it an object in one durable step; nothing half
      written is ever under a key.
    - :meth:`put_bytes`, :meth:`put_file`: both phases at once, for what lusai makes itself
      (SEG, SR, previews) and for tools and tests.
    - :meth:`path`: a local file to read the object from, for readers that want a path (pydicom,
      FastAPI's ``FileResponse``). The filesystem store returns the object itself (never write to
      it); a store elsewhere (an S3 bucket) would return a cached local copy it fetched.
    - :meth:`exists`: whether an object is stored, without fetching it.
    - :meth:`writable`: the health check (``/health``, ``lusai check``).

    Keys come from :func:`key_for`; methods taking a key raise ValueError for anything else.
    No member locks anything: content addressing makes two writers of one object write the same
    bytes to the same key, so the last one to finish changes nothing.
    """

    tmp_dir: Path

    def path(self, key: str) -> Path:
        """A local file holding the object's bytes (not checked to exist)."""
        ...

    def exists(self, key: str) -> bool:
        """Whether the object is stored."""
        ...

    def new_temp(self) -> Path:
        """A new empty temporary file, uniquely named (also across hosts), for :meth:`adopt`."""
        ...

    def adopt(
        self, tmp: Path, digest: tuple[str, int] | None = None, *, suffix: str = "dcm"
    ) -> tuple[str, str, int]:
        """Make the finished temporary file ``tmp`` an object, durably; (key, sha256, size).

        ``tmp`` is consumed when this returns; when it raises, ``tmp`` is left to the caller.
        """
        ...

    def put_bytes(self, chunks: Iterable[bytes], *, suffix: str = "dcm") -> tuple[str, str, int]:
        """Store the concatenated ``chunks``; (key, sha256, size). StorageFull when there is no room."""
        ...

    def put_file(self, src: Path) -> tuple[str, str, int]:
        """Store a copy of the DICOM file ``src``; (key, sha256, size). StorageFull when there is no room."""
        ...

    def writable(self) -> bool:
        """Whether an object could be written now."""
        ...


def _host_tag() -> str:
    """This host's name as a file name part (temporary files say which host made them)."""
    return re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:64] or "host"


class FilesystemStore(ObjectStore):
    """Objects as files under ``root``: ``root/objects/...`` by key, temporary files in ``root/tmp``.

    ``root`` may be a shared filesystem (NFS, an RWX volume) mounted on every host that runs the
    SCP, the API or a worker, at the path each host's ``LUSAI_STORAGE_ROOT`` names. What that
    relies on (docs/deployment.md, "Storage across hosts"; ``tests/service/core/
    test_storage_shared.py``):

    - ``rename(2)`` within the filesystem is atomic: a key names the whole object or nothing.
      ``tmp/`` and ``objects/`` are one filesystem (one export, one volume).
    - ``fsync`` of the file, then of the directories (objects/ab/cd and, when new, its parents),
      reaches the server's stable storage before :meth:`adopt` returns. On NFS the file's fsync
      is a COMMIT, and directory operations are synchronous on a server that exports ``sync``
      (the default; ``async`` exports break this). NFSv4 close-to-open consistency then makes a
      host that opens the key after ``adopt`` returned on another host (it learns the key from a
      committed database row) see every byte.
    - No locks: neither POSIX (``fcntl``) nor ``flock`` locks are taken by lusai's code. Two
      hosts storing the same object both rename identical bytes onto one key; the second rename
      replaces the first with the same content (a reader that has the replaced file open at that
      instant may get ESTALE from a server that does not keep it: an error of that read, retried
      like any other). Two hosts creating objects/ab/cd at once is fine (``mkdir``: EEXIST).
    - Temporary names are unique across hosts: ``<hostname>.<random>.part``, created with
      ``O_EXCL`` (atomic on the server under NFSv4), so two hosts never write one file even if
      their processes have the same PID.
    - A "no such file" answer may be cached by a host (NFS ``lookupcache``): lusai only looks
      up a key it read from a committed row, that is after the object was stored, so a stale
      negative entry can only make :meth:`adopt` rename identical bytes once more.
    - When the mount fails (EIO, ESTALE), turns read-only (EROFS) or disappears (ENOENT below the
      bare mount point), every write raises OSError and :meth:`adopt` never recreates
      ``objects/`` on the host's own disk: the ingest answers a failure (C-STORE 0x0110, or
      0xA700 when the received file cannot be moved into storage) and indexes nothing.
    - The temporary files of every host are in one ``tmp/``, and the recovery sweep of any host
      removes those untouched for an hour or more, by their mtime (set by the server's clock).
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)
        self._temp_prefix = f"{_host_tag()}."

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def new_temp(self) -> Path:
        """A fresh temporary path on the storage filesystem (so the final rename is atomic)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, prefix=self._temp_prefix, suffix=".part")
        os.close(fd)
        return Path(name)

    def adopt(
        self, tmp: Path, digest: tuple[str, int] | None = None, *, suffix: str = "dcm"
    ) -> tuple[str, str, int]:
        """Move a finished temporary file into place durably; returns (key, sha256, size).

        Without ``digest`` the file is hashed and fsynced here. With it, ``digest`` is the
        (SHA-256, size) computed while the bytes arrived, and ``tmp`` must already be fsynced, so
        the object is not read twice. Identical bytes already stored make this a no-op.
        """
        if digest is None:
            digest = _hash_and_fsync(tmp)
        sha, size = digest
        key = key_for(sha, suffix)
        final = self.root / key
        new_dirs = not final.parent.is_dir()
        if new_dirs:
            # One level at a time below objects/, never objects/ itself: when the shared mount has
            # gone, objects/ is missing and this fails instead of writing to the bare mount point.
            final.parent.parent.mkdir(exist_ok=True)
            final.parent.mkdir(exist_ok=True)
        if final.exists():
            tmp.unlink(missing_ok=True)
            return key, sha, size
        os.replace(tmp, final)
        _fsync_dir(final.parent)  # POSIX: the new entry lives in the directory, not in the file
        if new_dirs:  # objects/ab/cd just created: their own entries must be durable too
            _fsync_dir(final.parent.parent)
            _fsync_dir(final.parent.parent.parent)
        return key, sha, size

    def put_bytes(self, chunks: Iterable[bytes], *, suffix: str = "dcm") -> tuple[str, str, int]:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)

        return self._put(write, suffix)

    def put_file(self, src: Path) -> tuple[str, str, int]:
        return self._put(lambda tmp: shutil.copyfile(src, tmp), "dcm")

    def _put(self, write: Callable[[Path], object], suffix: str) -> tuple[str, str, int]:
        """Both phases; whatever fails (a full disk, a storage gone, a bad suffix) removes the
        temporary file, and a full disk is raised as StorageFull."""
        tmp = self.new_temp()
        try:
            write(tmp)
            return self.adopt(tmp, suffix=suffix)
        except BaseException as exc:
            _discard(tmp)
            if isinstance(exc, OSError) and exc.errno in NO_SPACE and not isinstance(exc, StorageFull):
                raise StorageFull(exc.errno, exc.strerror) from exc
            raise

    def free_bytes(self) -> int:
        """Free space on the storage filesystem (not in the interface: a bucket has no such figure)."""
        return shutil.disk_usage(self.root).free

    def writable(self) -> bool:
        """Health check: can we create and remove a file?"""
        try:
            self.new_temp().unlink()
            return True
        except OSError:
            return False


def _discard(tmp: Path) -> None:
    """Remove a temporary file that will not be adopted; a storage already gone leaves it to the sweep."""
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _hash_and_fsync(path: Path) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            size += len(chunk)
        os.fsync(fh.fileno())
    return digest.hexdigest(), size


def _fsync_dir(directory: Path) -> None:
    """Make a rename durable; filesystems that cannot fsync a directory are left as they are."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
