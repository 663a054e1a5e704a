"""Object storage: keys come from the bytes and our own kind of object only, and ``adopt`` is the one
durable way in (file and directory entries fsynced), with or without a digest computed upstream."""

from __future__ import annotations

import errno
import hashlib
import shutil
from pathlib import Path

import pytest

from service.core import storage
from service.core.storage import MEDIA_TYPES, FilesystemStore, ObjectStore, StorageFull, key_for, suffix_of

SHA = hashlib.sha256(b"x").hexdigest()


def test_keys_name_the_bytes_and_the_kind(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
    assert key_for(SHA) == f"objects/{SHA[:2]}/{SHA[2:4]}/{SHA}.dcm"
    for suffix in MEDIA_TYPES:
        key = key_for(SHA, suffix)
        assert suffix_of(key) == suffix and store.path(key) == tmp_path / key
    for sha, suffix in ((SHA, "txt"), (SHA, "dcm/../x"), ("../" + SHA[3:], "dcm"), (SHA.upper(), "dcm")):
        with pytest.raises(ValueError):
            key_for(sha, suffix)


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
        FilesystemStore(tmp_path).path(key)


def test_blobs_of_each_kind_are_content_addressed(tmp_path: Path) -> None:
    store = FilesystemStore(tmp_path)
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
    store = FilesystemStore(tmp_path)
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
    store = FilesystemStore(tmp_path)
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
    import sqlite3

    from sqlalchemy.exc import OperationalError

    from service.core.storage import storage_full

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


def test_temporary_files_say_which_host_made_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hosts sharing the storage write into one tmp/: names are unique across them (and the sweep's
    log and an operator can tell whose a leftover is)."""
    monkeypatch.setattr(storage.socket, "gethostname", lambda: "worker-7.example.org")
    store = FilesystemStore(tmp_path)
    tmp = store.new_temp()
    assert tmp.parent == store.tmp_dir and tmp.name.startswith("worker-7.example.org.")
    assert tmp.suffix == ".part" and tmp.stat().st_size == 0
    monkeypatch.setattr(storage.socket, "gethostname", lambda: "odd/host name")
    assert FilesystemStore(tmp_path).new_temp().name.startswith("odd_host_name.")


@pytest.mark.parametrize(
    ("failure", "raised"),
    [
        (OSError(errno.EIO, "Input/output error"), OSError),  # the shared mount failing
        (OSError(errno.ESTALE, "Stale file handle"), OSError),
        (OSError(errno.ENOSPC, "No space left on device"), StorageFull),  # delayed allocation at fsync
        (OSError(errno.EDQUOT, "Disk quota exceeded"), StorageFull),
    ],
    ids=["eio", "estale", "enospc", "edquot"],
)
def test_a_put_that_fails_at_fsync_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError, raised: type[OSError]
) -> None:
    store = FilesystemStore(tmp_path)

    def fsync_fails(path: Path) -> tuple[str, int]:
        raise failure

    monkeypatch.setattr(storage, "_hash_and_fsync", fsync_fails)
    src = tmp_path / "src.dcm"
    src.write_bytes(b"x")
    for put in (lambda: store.put_bytes([b"x"]), lambda: store.put_file(src)):
        with pytest.raises(raised) as info:
            put()
        assert info.value.errno == failure.errno
        assert not list(store.tmp_dir.iterdir()) and not list((tmp_path / "objects").iterdir())


def test_adopt_never_recreates_the_storage_under_a_mount_point_gone(tmp_path: Path) -> None:
    """A shared mount that disappeared leaves its bare mount point: adopt must fail there, not
    start a second, private storage on the host's own disk."""
    store = FilesystemStore(tmp_path / "mnt")
    tmp = store.new_temp()
    tmp.write_bytes(b"x")
    outside = tmp_path / "kept.part"
    tmp.rename(outside)
    shutil.rmtree(tmp_path / "mnt")  # what a host sees below the mount point once it is gone
    (tmp_path / "mnt").mkdir()
    with pytest.raises(FileNotFoundError):
        store.adopt(outside, (SHA, 1))
    assert not any((tmp_path / "mnt").iterdir()) and outside.exists()
    with pytest.raises(FileNotFoundError):
        store.put_bytes([b"x"])
    assert not store.writable() and not any((tmp_path / "mnt").iterdir())


def test_the_filesystem_store_is_an_object_store(tmp_path: Path) -> None:
    """Everything the interface names is implemented (mypy checks the signatures)."""
    members = {n for n in vars(ObjectStore) if not n.startswith("_")} | set(ObjectStore.__annotations__)
    assert members == {"tmp_dir", "path", "exists", "new_temp", "adopt", "put_bytes", "put_file", "writable"}
    for name in members - {"tmp_dir"}:
        assert getattr(FilesystemStore, name) is not getattr(ObjectStore, name)  # not the stub
    store: ObjectStore = FilesystemStore(tmp_path)
    assert store.tmp_dir.is_dir()
