"""Content-addressed object storage with atomic writes.

Keys are ``objects/<sha[:2]>/<sha[2:4]>/<sha>.dcm``, derived only from the bytes, never from a UID
or any other sender-controlled string, so a hostile UID cannot steer a path and identical sends
deduplicate for free. Writes go to a temporary file in the same filesystem, are fsynced and then
renamed into place, so a reader never sees half an object.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

_KEY_RE = re.compile(r"^objects/[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{64}\.dcm$")
CHUNK = 1 << 20


class StorageFull(OSError):
    """No space left for an incoming object (maps to DIMSE 0xA700)."""


class ObjectStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)

    @staticmethod
    def key_for(sha256: str) -> str:
        return f"objects/{sha256[:2]}/{sha256[2:4]}/{sha256}.dcm"

    def path(self, key: str) -> Path:
        if not _KEY_RE.match(key):
            raise ValueError("not a storage key")
        return self.root / key

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def new_temp(self) -> Path:
        """A fresh temporary path on the storage filesystem (so the final rename is atomic)."""
        fd, name = tempfile.mkstemp(dir=self.tmp_dir, suffix=".part")
        os.close(fd)
        return Path(name)

    def adopt(self, tmp: Path) -> tuple[str, str, int]:
        """Hash a finished temporary file and rename it into place; returns (key, sha256, size)."""
        digest = hashlib.sha256()
        size = 0
        with open(tmp, "rb") as fh:
            while chunk := fh.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
            os.fsync(fh.fileno())
        sha = digest.hexdigest()
        key = self.key_for(sha)
        final = self.root / key
        final.parent.mkdir(parents=True, exist_ok=True)
        if final.exists():
            tmp.unlink(missing_ok=True)  # identical bytes already stored
        else:
            os.replace(tmp, final)
        return key, sha, size

    def put_bytes(self, chunks: Iterable[bytes]) -> tuple[str, str, int]:
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
        return self.adopt(tmp)

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
