"""Content-addressed object storage with atomic, durable writes.

Keys are ``objects/<sha[:2]>/<sha[2:4]>/<sha>.<suffix>``, derived only from the bytes and the kind
of object (DICOM, or a preview image rendered by the worker), never from a UID or any other
sender-controlled string, so a hostile UID cannot steer a path and identical sends deduplicate for
free. Writes go to a temporary file in the same filesystem, are fsynced, renamed into place and the
rename made durable by fsyncing the directories, so a reader never sees half an object and a crash
after ``adopt`` returns cannot lose one.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

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


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key_for(sha256: str, suffix: str = "dcm") -> str:
        if not _SHA_RE.fullmatch(sha256) or suffix not in MEDIA_TYPES:
            raise ValueError("not a SHA-256 digest and object kind")
        return f"objects/{sha256[:2]}/{sha256[2:4]}/{sha256}.{suffix}"

    def path(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError("not a storage key")
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def new_temp(self) -> Path:
        """A fresh temporary path on the storage filesystem (so the final rename is atomic)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
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
        key = self.key_for(sha, suffix)
        final = self.root / key
        new_dirs = not final.parent.is_dir()
        final.parent.mkdir(parents=True, exist_ok=True)
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
        tmp = self.new_temp()
        try:
            with open(tmp, "wb") as fh:
                for chunk in chunks:
                    fh.write(chunk)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:  # ENOSPC
                raise StorageFull(str(exc)) from exc
            raise
        return self.adopt(tmp, suffix=suffix)

    def put_file(self, src: Path) -> tuple[str, str, int]:
        tmp = self.new_temp()
        try:
            shutil.copyfile(src, tmp)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:
                raise StorageFull(str(exc)) from exc
            raise
        return self.adopt(tmp)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def writable(self) -> bool:
        """Health check: can we create and remove a file?"""
        try:
            self.new_temp().unlink()
            return True
        except OSError:
            return False


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
