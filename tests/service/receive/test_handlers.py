"""The C-STORE handler without a network: one fake event per failure kind, each answered with its
DIMSE status, and no received file left behind on either receive path.

The event carries what pynetdicom gives the handler: the requestor's AE title, the request's
announced UIDs, and the data set either streamed into the adapter's sink (``_dataset_file``) or,
on pynetdicom's public path, as ``dataset_path`` in its own temporary folder.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from sqlalchemy import select

from service.core.db import Database
from service.core.dicom import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATA_SET_MISMATCH,
    STATUS_OUT_OF_RESOURCES,
    STATUS_PROCESSING_FAILURE,
    STATUS_SOP_CLASS_NOT_SUPPORTED,
    STATUS_SUCCESS,
)
from service.core.models import Instance
from service.core.runtime import Runtime
from service.core.storage import StorageFull
from service.receive import handlers
from service.receive.pynetdicom_adapter import IncomingObject
from service.receive.spool import pending
from tests.factories import cine, save


def _event(
    ds: Dataset,
    *,
    path: Path | None = None,
    sink: IncomingObject | None = None,
    ae_title: str = "SCANNER ",
    announced_uid: str | None = None,
) -> Any:
    """What pynetdicom hands the handler for one C-STORE request."""
    request = SimpleNamespace(
        AffectedSOPClassUID=ds.SOPClassUID,
        AffectedSOPInstanceUID=announced_uid or ds.SOPInstanceUID,
        _dataset_file=sink,
    )
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=ae_title))
    return SimpleNamespace(assoc=assoc, request=request, dataset_path=path)


def _public(ds: Dataset, folder: Path, **kw: Any) -> tuple[Any, Path]:
    """The public path: pynetdicom streamed the data set into a file of its own temp folder."""
    path = save(ds, folder / "pynetdicom" / "received.dcm")
    return _event(ds, path=path, **kw), path


def _streamed(ds: Dataset, runtime: Runtime, folder: Path, limit: int = 10**9) -> tuple[Any, IncomingObject]:
    """The adapter's path: the data set streamed into a sink in the store's ``tmp/``."""
    sink = IncomingObject(runtime.store.tmp_dir, limit)
    sink.write(save(ds, folder / "sent.dcm").read_bytes())
    return _event(ds, sink=sink), sink


def _instances(runtime: Runtime) -> list[Instance]:
    with runtime.db.session() as s:
        rows = list(s.scalars(select(Instance)))
        s.expunge_all()
        return rows


def _nothing_left(runtime: Runtime) -> bool:
    """No temporary file in the store and no object stored."""
    return not list(runtime.store.tmp_dir.iterdir()) and not list(
        (runtime.store.root / "objects").rglob("*.*")
    )


def test_echo_succeeds() -> None:
    assert handlers.handle_echo(SimpleNamespace()) == STATUS_SUCCESS  # type: ignore[arg-type]


def test_public_path_stores_and_takes_the_file_over(runtime: Runtime, tmp_path: Path) -> None:
    ds = cine("raw", frames=2)
    event, path = _public(ds, tmp_path)
    assert handlers.make_store_handler(runtime)(event) == STATUS_SUCCESS
    assert not path.exists()  # moved into the store, not copied
    [inst] = _instances(runtime)
    assert (inst.sop_instance_uid, inst.calling_ae) == (ds.SOPInstanceUID, "SCANNER")
    assert not list(runtime.store.tmp_dir.iterdir())


def test_streamed_path_stores_with_the_digest_of_the_receive(runtime: Runtime, tmp_path: Path) -> None:
    ds = cine("raw", frames=2)
    event, sink = _streamed(ds, runtime, tmp_path)
    digest = sink.sha256
    event.assoc.requestor.ae_title = "  "  # a blank AE title is recorded as none
    assert handlers.make_store_handler(runtime)(event) == STATUS_SUCCESS
    assert sink.name == ""  # ours now: pynetdicom's clean-up must not unlink the renamed path
    [inst] = _instances(runtime)
    assert inst.sha256 == digest and inst.calling_ae is None
    assert not list(runtime.store.tmp_dir.iterdir())


@pytest.mark.parametrize(
    ("make", "status"),
    [
        (
            lambda: cine("raw", frames=1, sop_class=CTImageStorage, modality="CT"),
            STATUS_SOP_CLASS_NOT_SUPPORTED,
        ),
        (lambda: _claiming(cine("raw", frames=4), frames=5), STATUS_DATA_SET_MISMATCH),
    ],
    ids=["other-sop-class", "frames-do-not-add-up"],
)
def test_refused_objects_answer_their_status_on_both_paths(
    runtime: Runtime, tmp_path: Path, make: Callable[[], Dataset], status: int
) -> None:
    store = handlers.make_store_handler(runtime)
    event, path = _public(make(), tmp_path)
    assert store(event) == status and not path.exists()
    event, _ = _streamed(make(), runtime, tmp_path)
    assert store(event) == status
    assert _instances(runtime) == [] and _nothing_left(runtime)


def _claiming(ds: Dataset, frames: int) -> Dataset:
    ds.NumberOfFrames = frames
    return ds


def test_uids_other_than_announced_are_a_mismatch(runtime: Runtime, tmp_path: Path) -> None:
    event, _ = _public(cine("raw", frames=2), tmp_path, announced_uid="1.2.826.0.1.3680043.2.1143.999")
    assert handlers.make_store_handler(runtime)(event) == STATUS_DATA_SET_MISMATCH
    assert _nothing_left(runtime)


def test_a_cut_off_object_cannot_be_understood(runtime: Runtime, tmp_path: Path) -> None:
    ds = cine("raw", frames=2)
    event, path = _public(ds, tmp_path)
    with open(path, "ab") as fh:  # a trailing element that claims 1 MiB and carries 100 bytes
        fh.write(b"\xfc\xff\xfc\xff" + b"OB\0\0" + (1 << 20).to_bytes(4, "little") + b"\0" * 100)
    assert handlers.make_store_handler(runtime)(event) == STATUS_CANNOT_UNDERSTAND
    assert _nothing_left(runtime)


def test_too_large_is_out_of_resources_on_both_paths(runtime: Runtime, tmp_path: Path) -> None:
    small = runtime.settings.model_copy(update={"max_object_bytes": 10_000})
    store = handlers.make_store_handler(replace(runtime, settings=small))
    ds = cine("raw", frames=4)  # about 21 kB
    event, path = _public(ds, tmp_path)
    assert store(event) == STATUS_OUT_OF_RESOURCES and not path.exists()
    event, sink = _streamed(ds, runtime, tmp_path, limit=10_000)  # the sink stopped writing
    assert sink.oversize
    assert store(event) == STATUS_OUT_OF_RESOURCES
    assert _nothing_left(runtime)


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (errno.ENOSPC, STATUS_OUT_OF_RESOURCES),
        (errno.EDQUOT, STATUS_OUT_OF_RESOURCES),
        (errno.EIO, STATUS_PROCESSING_FAILURE),
    ],
)
def test_a_write_error_while_streaming(runtime: Runtime, tmp_path: Path, error: int, status: int) -> None:
    event, sink = _streamed(cine("raw", frames=2), runtime, tmp_path)
    sink.error = OSError(error, "write failed")  # what the sink remembers instead of raising
    assert handlers.make_store_handler(runtime)(event) == status
    assert _nothing_left(runtime)


@pytest.mark.parametrize(
    ("error", "status"), [(errno.ENOSPC, STATUS_OUT_OF_RESOURCES), (errno.EIO, STATUS_PROCESSING_FAILURE)]
)
def test_an_fsync_error_before_answering(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: int, status: int
) -> None:
    event, sink = _streamed(cine("raw", frames=2), runtime, tmp_path)

    def sync() -> None:
        raise OSError(error, "fsync failed")

    monkeypatch.setattr(sink, "sync", sync)
    assert handlers.make_store_handler(runtime)(event) == status
    assert _nothing_left(runtime)


def test_the_received_file_that_cannot_be_taken_over(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def new_temp() -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runtime.store, "new_temp", new_temp)
    event, path = _public(cine("raw", frames=2), tmp_path)
    assert handlers.make_store_handler(runtime)(event) == STATUS_OUT_OF_RESOURCES
    assert not path.exists()


@pytest.mark.parametrize(
    ("raised", "status"),
    [
        (StorageFull(errno.ENOSPC, "full"), STATUS_OUT_OF_RESOURCES),
        (OSError(errno.EDQUOT, "quota"), STATUS_OUT_OF_RESOURCES),
        (OSError(errno.EIO, "I/O error"), STATUS_PROCESSING_FAILURE),
    ],
    ids=["storage-full", "quota", "io-error"],
)
def test_a_storage_failure(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raised: OSError, status: int
) -> None:
    def adopt(tmp: Path, *_: Any, **__: Any) -> tuple[str, str, int]:
        raise raised

    monkeypatch.setattr(runtime.store, "adopt", adopt)
    event, _ = _public(cine("raw", frames=2), tmp_path)
    assert handlers.make_store_handler(runtime)(event) == status
    assert _instances(runtime) == [] and _nothing_left(runtime)


def test_a_database_down_spools_the_stored_object_and_succeeds(runtime: Runtime, tmp_path: Path) -> None:
    no_tables = Database(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    store = handlers.make_store_handler(replace(runtime, db=no_tables))
    event, _ = _public(cine("raw", frames=2), tmp_path)
    assert store(event) == STATUS_SUCCESS  # stored: the sender need not retry
    no_tables.dispose()
    [(_, record)] = pending(runtime.settings)
    assert runtime.store.path(str(record["key"])).is_file() and record["calling_ae"] == "SCANNER"


def test_a_database_down_without_a_spool_is_a_processing_failure(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(handlers, "spool_object", lambda *_: False)
    no_tables = Database(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    store = handlers.make_store_handler(replace(runtime, db=no_tables))
    event, _ = _public(cine("raw", frames=2), tmp_path)
    assert store(event) == STATUS_PROCESSING_FAILURE  # nothing promised: the sender retries
    no_tables.dispose()


def test_a_bug_costs_one_object_not_the_association(
    runtime: Runtime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def ingest_file(*_: Any, **__: Any) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(handlers, "ingest_file", ingest_file)
    event, _ = _public(cine("raw", frames=2), tmp_path)
    assert handlers.make_store_handler(runtime)(event) == STATUS_PROCESSING_FAILURE


def test_a_dropped_association_discards_its_partial_object(runtime: Runtime) -> None:
    sink = IncomingObject(runtime.store.tmp_dir, 10**9)
    sink.write(b"half an object")
    assoc = SimpleNamespace(dimse=SimpleNamespace(message=SimpleNamespace(_data_set_file=sink)))
    handlers.handle_connection_lost(SimpleNamespace(assoc=assoc))  # type: ignore[arg-type]
    assert not list(runtime.store.tmp_dir.iterdir()) and sink.name == ""
