"""The filesystem store on a shared mount, written and read by two "hosts" at once.

Each host is a process of its own (forked) in its own mount and UTS namespaces: its own hostname
(``host-a``, ``host-b``) and its own bind mount (``mount --bind``) of one export folder at a path
of its own, which the other process (and the test) cannot see. What one host stores is read by
the other through the other's mount, as a worker reads what the SCP stored.

What this proves and what not: the store's own protocol across processes, paths and hostnames
(two-phase writes, atomic rename onto a content key, concurrent writers of one object or one
shard directory, unique temporary names, a writer killed with SIGKILL, a mount that turns
read-only or disappears while in use). Both mounts share one kernel and page cache, so no client
cache stands between them: NFS's close-to-open consistency, attribute and lookup caching are
documented (``FilesystemStore``'s docstring, docs/deployment.md, "Storage across hosts"), not
tested; this kernel has no NFS client. Needs root (namespaces, mounts): skipped elsewhere,
a failure under LUSAI_REQUIRE_EXTERNAL=1.
"""

from __future__ import annotations

import ctypes
import hashlib
import multiprocessing
import os
import random
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

import pytest

from service.core.storage import FilesystemStore, key_for
from tests.conftest import missing

CLONE_NEWNS, CLONE_NEWUTS = 0x00020000, 0x04000000
MS_RDONLY, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 1, 32, 4096, 16384, 1 << 18
MNT_DETACH = 2
ROUNDS = 50

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_fork = multiprocessing.get_context("fork")


def _check(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _mount(source: Path | None, target: Path, flags: int) -> None:
    _check(_libc.mount(str(source).encode() if source else b"none", str(target).encode(), None, flags, None))


def _become_host(name: str, export: Path, mount_point: Path) -> None:
    """In a fresh child: namespaces of its own, hostname ``name``, ``export`` at ``mount_point``."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS))
    _mount(None, Path("/"), MS_REC | MS_PRIVATE)  # nothing mounted here reaches the parent
    socket.sethostname(name)
    _mount(export, mount_point, MS_BIND)


def _mounted_here(mount_point: Path) -> bool:
    with open("/proc/self/mountinfo") as fh:
        return any(line.split()[4] == str(mount_point) for line in fh)


@dataclass
class Host:
    name: str
    mount_point: Path


@dataclass
class Shared:
    """One export folder, and a host per name that mounts it at its own path."""

    export: Path
    hosts: dict[str, Host]

    def run(self, *jobs: tuple[str, Callable[..., Any], tuple[Any, ...]], timeout: float = 30) -> list[Any]:
        """Run ``fn(store, *args)`` on each named host at once, each in its own process; the results."""
        results = _fork.Queue()
        procs = []
        for name, fn, args in jobs:
            host = self.hosts[name]
            proc = _fork.Process(target=_host_main, args=(host, self.export, fn, args, results), daemon=True)
            proc.start()
            procs.append(proc)
        got: dict[str, Any] = {}
        try:
            for _ in procs:
                name, ok, value = results.get(timeout=timeout)
                assert ok, f"{name} failed:\n{value}"
                got[name] = value
        finally:
            for proc in procs:
                proc.join(timeout=5)
                if proc.is_alive():
                    proc.kill()
        return [got[name] for name, _, _ in jobs]

    def objects(self) -> dict[str, bytes]:
        root = self.export / "objects"
        return {str(p.relative_to(self.export)): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    def temp_files(self) -> list[Path]:
        return sorted((self.export / "tmp").iterdir())


def _host_main(host: Host, export: Path, fn: Callable[..., Any], args: tuple[Any, ...], results: Any) -> None:
    try:
        _become_host(host.name, export, host.mount_point)
        assert _mounted_here(host.mount_point) and socket.gethostname() == host.name
        results.put((host.name, True, fn(FilesystemStore(host.mount_point), *args)))
    except BaseException:
        results.put((host.name, False, traceback.format_exc()))


_usable: bool | None = None


def _namespaces_usable() -> bool:
    """Whether this machine lets a root process make mount namespaces and bind mounts."""
    global _usable
    if _usable is None:
        _usable = False
        if os.geteuid() == 0:
            probe = Path(f"/tmp/lusai-probe-{os.getpid()}")
            probe.mkdir(exist_ok=True)
            try:
                proc = _fork.Process(target=_become_host, args=("probe", probe, probe))
                proc.start()
                proc.join(timeout=10)
                _usable = proc.exitcode == 0
            finally:
                probe.rmdir()
    return _usable


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[Shared]:
    if not _namespaces_usable():
        missing("root with mount namespaces and bind mounts")
    export = tmp_path / "export"
    export.mkdir()
    hosts = {}
    for name in ("host-a", "host-b"):
        mount_point = tmp_path / name / "storage"  # each host's LUSAI_STORAGE_ROOT
        mount_point.mkdir(parents=True)
        hosts[name] = Host(name, mount_point)
    yield Shared(export, hosts)
    for host in hosts.values():  # the namespaces died with their processes, and their mounts too
        assert not _mounted_here(host.mount_point) and not any(host.mount_point.iterdir())


def _payload(seed: int | str, size: int | None = None) -> bytes:
    rng = random.Random(seed)
    return rng.randbytes(size if size is not None else rng.randrange(256 << 10, 1 << 20))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- what each host does ---------------------------------------------------------------------


def _hold_mount(store: FilesystemStore, ready: Event, release: Event) -> list[str]:
    store.put_bytes([b"seen through host-a's mount"])
    ready.set()
    assert release.wait(20)
    return sorted(p.name for p in store.root.iterdir())


def _put_same_objects(store: FilesystemStore, barrier: Any) -> tuple[list[tuple[str, str, int]], int]:
    """Every round both hosts store the same bytes at the same moment: put_bytes, or a temporary
    file written first and both adopts released together (the rename race itself). Each then
    reads the object back at once, while the other host may still be storing it: (what each
    was told, how many reads were not the whole object)."""
    out, torn = [], 0
    for i in range(ROUNDS):
        data = _payload(i)
        if i % 2:
            tmp = store.new_temp()
            tmp.write_bytes(data)
            barrier.wait(10)
            out.append(store.adopt(tmp))
        else:
            barrier.wait(10)
            out.append(store.put_bytes([data]))
        torn += store.path(out[-1][0]).read_bytes() != data
    return out, torn


def _write_and_announce(store: FilesystemStore, announce: Any) -> int:
    for i in range(12):
        data = _payload(f"big-{i}", (256 << 10) * (i + 1))  # 256 KiB .. 3 MiB
        tmp = store.new_temp()
        with open(tmp, "wb") as fh:
            for start in range(0, len(data), 1 << 16):  # written piece by piece, like a receive
                fh.write(data[start : start + (1 << 16)])
            os.fsync(fh.fileno())
        announce.put(store.adopt(tmp, (_sha(data), len(data))))  # the SCP's path: digest known
    announce.put(None)
    return 12


def _read_when_announced(store: FilesystemStore, announce: Any) -> list[tuple[str, str, int, str, int, bool]]:
    seen = []
    while (item := announce.get(timeout=20)) is not None:
        key, sha, size = item
        exists = store.exists(key)
        data = store.path(key).read_bytes()  # at once: no wait, no retry
        seen.append((key, sha, size, _sha(data), len(data), exists))
    return seen


def _put_many(store: FilesystemStore, barrier: Any, payloads: list[bytes]) -> list[str]:
    barrier.wait(10)
    put = (lambda d: store.put_bytes([d]), lambda d: store.put_file(_as_file(store, d)))
    return [put[i % 2](data)[0] for i, data in enumerate(payloads)]


def _as_file(store: FilesystemStore, data: bytes) -> Path:
    src = store.root.parent / f"src-{os.getpid()}"  # outside the storage: the host's own disk
    src.write_bytes(data)
    return src


def _killed_while_writing(store: FilesystemStore, writing: Event) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"x" * (1 << 20)
        writing.set()
        time.sleep(60)  # SIGKILLed here, half way through the object
        yield b"never written"

    store.put_bytes(chunks())


def _storage_goes_away(store: FilesystemStore) -> dict[str, Any]:
    out: dict[str, Any] = {"before": store.put_bytes([b"stored before the trouble"])[0]}
    # The server (or the volume) turns read-only: nothing can be stored, the health check says so.
    _mount(None, store.root, MS_REMOUNT | MS_BIND | MS_RDONLY)
    out["read-only writable"] = store.writable()
    try:
        store.put_bytes([b"while read-only"])
    except OSError as exc:
        out["read-only put"] = exc.errno
    _mount(None, store.root, MS_REMOUNT | MS_BIND)
    # Half way through a write the mount disappears (a lazy unmount: the open file still works).
    data = _payload("cut", 1 << 20)
    tmp = store.new_temp()
    with open(tmp, "wb") as fh:
        fh.write(data[: len(data) // 2])
        _check(_libc.umount2(str(store.root).encode(), MNT_DETACH))
        fh.write(data[len(data) // 2 :])
        os.fsync(fh.fileno())
    try:
        store.adopt(tmp, (_sha(data), len(data)))
    except OSError as exc:
        out["adopt after unmount"] = exc.errno
    try:
        store.put_bytes([b"after the unmount"])
    except OSError as exc:
        out["put after unmount"] = exc.errno
    out["writable after unmount"] = store.writable()
    out["left on the bare mount point"] = sorted(os.listdir(store.root))
    out["cut key"] = key_for(_sha(data))
    return out


# -- the tests ---------------------------------------------------------------------------------


def test_each_host_sees_the_export_through_its_own_mount_only(shared: Shared) -> None:
    ready, release = _fork.Event(), _fork.Event()
    proc = _fork.Process(
        target=_host_main,
        args=(shared.hosts["host-a"], shared.export, _hold_mount, (ready, release), _fork.Queue()),
        daemon=True,
    )
    proc.start()
    try:
        assert ready.wait(20)
        a = shared.hosts["host-a"].mount_point
        # host-a's mount is in host-a's namespace only: here its mount point is an empty folder.
        assert not _mounted_here(a) and not any(a.iterdir())
        assert list(shared.objects().values()) == [b"seen through host-a's mount"]
    finally:
        release.set()
        proc.join(10)
    assert proc.exitcode == 0


def test_two_hosts_storing_the_same_object_at_once_leave_one_whole_file(shared: Shared) -> None:
    barrier = _fork.Barrier(2)
    a, b = shared.run(
        ("host-a", _put_same_objects, (barrier,)),
        ("host-b", _put_same_objects, (barrier,)),
    )
    expected = [(key_for(_sha(d)), _sha(d), len(d)) for d in map(_payload, range(ROUNDS))]
    assert a == b == (expected, 0)  # both told the same key, sha and size; no read saw less
    assert shared.objects() == {key: _payload(i) for i, (key, _, _) in enumerate(expected)}
    assert shared.temp_files() == []


def test_an_object_adopted_on_one_host_is_whole_on_the_other_at_once(shared: Shared) -> None:
    announce = _fork.Queue()
    written, seen = shared.run(
        ("host-a", _write_and_announce, (announce,)),
        ("host-b", _read_when_announced, (announce,)),
    )
    assert written == len(seen) == 12
    for key, sha, size, read_sha, read_size, exists in seen:
        assert (read_sha, read_size, exists) == (sha, size, True) and key == key_for(sha)
    assert shared.temp_files() == []


def test_different_objects_from_both_hosts_at_once_are_all_stored(shared: Shared) -> None:
    # Objects whose keys share objects/00/: both hosts create and fill the same shard folders.
    payloads: list[bytes] = []
    n = 0
    while len(payloads) < 60:
        data = _payload(f"shard-{n}", 2048)
        n += 1
        if _sha(data).startswith("00"):
            payloads.append(data)
    barrier = _fork.Barrier(2)
    a, b = shared.run(
        ("host-a", _put_many, (barrier, payloads[:30])),
        ("host-b", _put_many, (barrier, payloads[30:])),
    )
    assert a + b == [key_for(_sha(d)) for d in payloads]
    assert shared.objects() == {key_for(_sha(d)): d for d in payloads}
    assert shared.temp_files() == []


def test_a_writer_killed_mid_object_leaves_only_a_temporary_file_the_sweep_removes(
    shared: Shared, data_dir: Path
) -> None:
    from service.core import recovery
    from service.core.runtime import Runtime
    from service.core.settings import Settings

    writing = _fork.Event()
    proc = _fork.Process(
        target=_host_main,
        args=(shared.hosts["host-a"], shared.export, _killed_while_writing, (writing,), _fork.Queue()),
        daemon=True,
    )
    proc.start()
    assert writing.wait(20)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    assert proc.exitcode == -signal.SIGKILL
    assert shared.objects() == {}  # never a partial object under a key
    [orphan] = shared.temp_files()
    assert orphan.name.startswith("host-a.") and orphan.name.endswith(".part")  # whose it was
    assert orphan.stat().st_size == 1 << 20

    # The recovery sweep of any host (here a third one, on the export itself) removes it once no
    # live writer could still be writing to it, and not before.
    with Runtime.from_settings(Settings(storage_root=shared.export)) as runtime:
        assert recovery.remove_stale_temp_files(runtime) == 0
        assert recovery.remove_stale_temp_files(runtime, now=orphan.stat().st_mtime + 7200) == 1
    assert shared.temp_files() == []


def test_a_mount_that_turns_read_only_or_disappears_fails_every_write(shared: Shared) -> None:
    """What the ingest gets is an OSError: handlers.py answers 0x0110 and indexes nothing (C-STORE,
    ``tests/service/receive/test_handlers.py::test_a_storage_failure``); a real NFS mount answers
    EIO or ESTALE where this bind mount answers EROFS and ENOENT."""
    import errno

    [out] = shared.run(("host-b", _storage_goes_away, ()))
    assert out["read-only put"] == errno.EROFS and out["read-only writable"] is False
    assert out["adopt after unmount"] == errno.ENOENT
    assert out["put after unmount"] == errno.ENOENT and out["writable after unmount"] is False
    assert out["left on the bare mount point"] == []  # objects/ not recreated on the host's disk
    assert set(shared.objects()) == {out["before"]} and out["cut key"] not in shared.objects()
    [orphan] = shared.temp_files()  # the file being written when the mount went: for the sweep
    assert orphan.name.startswith("host-b.")
