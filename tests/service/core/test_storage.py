"""Object storage: keys come from the bytes and our own kind of object only, and ``adopt`` is the one
durable way in (file and directory entries fsynced), with or without a digest computed upstream."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from service.core import storage
from service.core.storage import MEDIA_TYPES, ObjectStore, suffix_of

SHA = hashlib.sha256(b"x").hexdigest()


def test_keys_name_the_bytes_and_the_kind(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    assert store.key_for(SHA) == f"objects/{SHA[:2]}/{SHA[2:4]}/{SHA}.dcm"
    for suffix in MEDIA_TYPES:
        key = store.key_for(SHA, suffix)
        assert suffix_of(key) == suffix and store.path(key) == tmp_path / key
    for sha, suffix in ((SHA, "txt"), (SHA, "dcm/../x"), ("../" + SHA[3:], "dcm"), (SHA.upper(), "dcm")):
        with pytest.raises(ValueError):
            store.key_for(sha, suffix)


@pytest.mark.parametrize(
    "key",
    [
        f"objects/{SHA[:2]}/{SHA[2:4]}/{SHA}.txt",
        f"objects/{SHA[:2]}/{SHA[2:4]}/{SHA}.png/../../x.dcm",
        f"objects/{SHA[:2]}/{SHA[2:4]}/{SHA}.dcm\n",
        f"objects/ff/{SHA[2:4]}/{SHA}.png" if SHA[:2] != "ff" else f"objects/00/{SHA[2:4]}/{SHA}.png",
        f"objects/{SHA[:2]}/{SHA[2:4]}/{SHA[:-1]}.gif",
        f"/etc/{SHA}.dcm",
        "k",
    ],
)
def test_path_refuses_anything_but_a_key(tmp_path: Path, key: str) -> None:
    with pytest.raises(ValueError):
        ObjectStore(tmp_path).path(key)


def test_blobs_of_each_kind_are_content_addressed(tmp_path: Path) -> None:
    store = ObjectStore(tmp_path)
    dcm, sha, size = store.put_bytes([b"same ", b"bytes"])
    png, png_sha, _ = store.put_bytes([b"same bytes"], suffix="png")
    assert (sha, size) == (hashlib.sha256(b"same bytes").hexdigest(), 10) and png_sha == sha
    assert dcm.endswith(".dcm") and png == dcm.removesuffix(".dcm") + ".png"
    assert store.put_bytes([b"same bytes"], suffix="png")[0] == png  # deduplicated
    assert store.path(png).read_bytes() == b"same bytes" and not list(store.tmp_dir.iterdir())
    with pytest.raises(ValueError):
        store.put_bytes([b"x"], suffix="html")


def _record_dir_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    synced: list[Path] = []
    real = storage._fsync_dir

    def record(directory: Path) -> None:
        synced.append(directory)
        real(directory)

    monkeypatch.setattr(storage, "_fsync_dir", record)
    return synced


def test_adopt_makes_the_rename_durable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ObjectStore(tmp_path)
    synced = _record_dir_fsyncs(monkeypatch)
    tmp = store.new_temp()
    tmp.write_bytes(b"x")
    key, sha, size = store.adopt(tmp)
    final = store.path(key)
    assert (sha, size) == (SHA, 1) and final.read_bytes() == b"x" and not tmp.exists()
    # objects/ab/cd was created: the file's directory and both new directories' parents.
    assert synced == [final.parent, final.parent.parent, tmp_path / "objects"]
    synced.clear()
    other = store.new_temp()
    other.write_bytes(b"x")
    assert store.adopt(other, suffix="gif")[0] == key.removesuffix(".dcm") + ".gif"
    assert synced == [final.parent]  # same directory, already durable
    synced.clear()
    again = store.new_temp()
    again.write_bytes(b"x")
    assert store.adopt(again)[0] == key and not again.exists() and synced == []  # already stored


def test_adopt_trusts_a_digest_computed_while_receiving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SCP hashes (and fsyncs) while the bytes arrive, so adopt must not read the file again."""
    store = ObjectStore(tmp_path)
    synced = _record_dir_fsyncs(monkeypatch)

    def no_rehash(path: Path) -> tuple[str, int]:
        raise AssertionError("file read again")

    monkeypatch.setattr(storage, "_hash_and_fsync", no_rehash)
    tmp = store.new_temp()
    tmp.write_bytes(b"x")
    key, sha, size = store.adopt(tmp, (SHA, 1))
    assert (sha, size) == (SHA, 1) and store.path(key).read_bytes() == b"x"
    assert synced[0] == store.path(key).parent
    bad = store.new_temp()
    with pytest.raises(ValueError):
        store.adopt(bad, ("../../etc/passwd", 1))
    assert bad.exists()  # the caller (ingest) removes what it could not adopt


def test_storage_full_recognises_a_full_disk_wherever_it_surfaces() -> None:
    import errno
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from service.core.storage import StorageFull, storage_full

    enospc = OSError(errno.ENOSPC, "No space left on device")
    try:
        raise RuntimeError("writing the SEG") from enospc
    except RuntimeError as exc:
        wrapped = exc
    sqlite_full = sqlite3.OperationalError("database or disk is full")
    sqlite_full.sqlite_errorcode = 13  # type: ignore[attr-defined]
    assert storage_full(enospc) and storage_full(wrapped) and storage_full(StorageFull("x"))
    assert storage_full(OSError(errno.EDQUOT, "quota"))
    assert storage_full(OperationalError("INSERT", {}, sqlite_full))
    assert not storage_full(OSError(errno.EIO, "I/O error"))
    assert not storage_full(ValueError("no"))
    assert not storage_full(OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked")))
