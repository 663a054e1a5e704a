"""``lusai send``: C-STORE files or folders to a DICOM peer, for administrators testing routes.

Files go out as they are stored; the SCU never transcodes. A header-only pass finds each file's
SOP class and transfer syntax, each pair gets its own presentation context (the file's syntax
first, so a peer can agree on it rather than on something we cannot produce), and each file is
read in full only right before its C-STORE and dropped after: a folder of thousands of cines
needs the memory of one. More than 128 pairs (the most one association can propose) are sent
over one association per batch of pairs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import pydicom
import typer
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, MediaStorageDirectoryStorage
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from service.cli.app import app
from service.core.dicom import stored
from service.core.settings import Destination, Settings

console = Console(stderr=True)

MAX_CONTEXTS = 128  # presentation context IDs are the odd numbers 1-255


@dataclass(frozen=True)
class _Item:
    """One file found sendable by the header pass (no data set is kept)."""

    path: Path
    sop_class: str
    transfer_syntax: str

    @property
    def key(self) -> tuple[str, str]:
        return self.sop_class, self.transfer_syntax


def _files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            out.append(p)
        else:
            raise typer.BadParameter(f"no such file or folder: {p}")
    return out


def _scan(files: list[Path]) -> tuple[list[_Item], int, list[str]]:
    """Header-only pass: what to send, how many files were skipped, and the per-file errors."""
    items: list[_Item] = []
    skipped = 0
    errors: list[str] = []
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, defer_size=1024)
        except InvalidDicomError:
            skipped += 1
            continue
        except Exception as exc:  # a DICOM file cut short or corrupt: pydicom raises many types
            errors.append(f"{f}: unreadable: {_reason(exc)}")
            continue
        meta = getattr(ds, "file_meta", None)
        if meta is not None and meta.get("MediaStorageSOPClassUID") == MediaStorageDirectoryStorage:
            skipped += 1  # a DICOMDIR: an index, not an object to store
            continue
        sop_class, sop_instance = ds.get("SOPClassUID"), ds.get("SOPInstanceUID")
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        if not (sop_class and sop_instance and ts):
            errors.append(f"{f}: not sendable: no SOP Class UID, SOP Instance UID or Transfer Syntax UID")
            continue
        if not (UID(str(sop_class)).is_valid and UID(str(ts)).is_transfer_syntax):
            errors.append(f"{f}: not sendable: invalid SOP Class UID or unknown transfer syntax {ts}")
            continue
        items.append(_Item(f, str(sop_class), str(ts)))
    return items, skipped, errors


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "no detail"
    return f"{type(exc).__name__}: {text[:200]}"


def _proposal(ts: str) -> list[str]:
    """The file's own syntax first; an uncompressed little-endian file may also go as either LE
    syntax (pynetdicom re-encodes the data set), a compressed one only as it is."""
    uid = UID(ts)
    if uid.is_encapsulated or not uid.is_little_endian:
        return [ts]
    return list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))


def _batches(items: list[_Item]) -> Iterator[tuple[list[tuple[str, str]], list[_Item]]]:
    """At most MAX_CONTEXTS (SOP class, transfer syntax) pairs per association, with their files."""
    keys = sorted({item.key for item in items})
    for start in range(0, len(keys), MAX_CONTEXTS):
        chunk = keys[start : start + MAX_CONTEXTS]
        wanted = set(chunk)
        yield chunk, [item for item in items if item.key in wanted]


def _accepted(assoc: Association, sop_class: str, ts: str) -> bool:
    """Whether the peer agreed to a context that can carry this data set (pynetdicom's own rule:
    the same syntax, or two uncompressed ones of the same byte order)."""
    uid = UID(ts)
    for cx in assoc.accepted_contexts:
        if cx.abstract_syntax != sop_class or not cx.as_scu or not cx.transfer_syntax:
            continue
        agreed = UID(cx.transfer_syntax[0])
        if agreed == uid or (
            not agreed.is_compressed
            and not uid.is_compressed
            and agreed.is_little_endian == uid.is_little_endian
        ):
            return True
    return False


def _read(path: Path) -> pydicom.Dataset:
    """The whole file, pixel data included: called right before its C-STORE, never earlier."""
    return pydicom.dcmread(path)


def _store(assoc: Association, item: _Item) -> str | None:
    """C-STORE one file; None when the peer stored it, else why not (one line)."""
    try:
        ds = _read(item.path)
    except Exception as exc:  # changed or removed since the header pass
        return f"unreadable: {_reason(exc)}"
    sop_class = str(ds.get("SOPClassUID", ""))
    ts = str(getattr(ds, "file_meta", pydicom.Dataset()).get("TransferSyntaxUID", ""))
    if (sop_class, ts) != item.key:
        return "changed since it was scanned; send it again"
    if not _accepted(assoc, sop_class, ts):
        return f"the peer did not accept {UID(sop_class).name} in {UID(ts).name}"
    try:
        status = assoc.send_c_store(ds)
    except Exception as exc:  # e.g. a data set pynetdicom cannot encode
        return f"not sent: {_reason(exc)}"
    if "Status" not in status:
        return "no response from the peer (timed out, or the association was aborted)"
    code = int(status.Status)
    if not stored(code):
        comment = " ".join(str(status.get("ErrorComment", "")).split())[:200]
        return f"refused by the peer, status 0x{code:04X}" + (f" ({comment})" if comment else "")
    return None


def _associate(ae: AE, dest: Destination, contexts: list[PresentationContext]) -> Association | str:
    """An established association, or why there is none."""
    try:
        assoc = ae.associate(dest.host, dest.port, contexts, ae_title=dest.ae_title)
    except Exception as exc:  # pynetdicom reports most failures as a closed association; not all
        return _reason(exc)
    if assoc.is_established:
        return assoc
    return "rejected" if assoc.is_rejected else "no answer, or aborted"


def _error(text: str) -> None:
    console.print(f"[yellow]{escape(text)}[/yellow]", soft_wrap=True)


@app.command()
def send(
    paths: Annotated[list[Path], typer.Argument(help="DICOM files or folders (searched recursively).")],
    to: Annotated[str, typer.Option("--to", help="Destination AET@host:port.")],
    calling_ae: Annotated[str | None, typer.Option(help="Our AE title (default LUSAI_AE_TITLE).")] = None,
) -> None:
    """C-STORE files to a peer with a progress bar; exit code 1 if any object failed."""
    try:
        dest = Destination.parse(to)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--to") from exc
    if dest.transport != "dimse":
        raise typer.BadParameter("send speaks C-STORE: give the peer as AET@host:port", param_hint="--to")
    items, skipped, errors = _scan(_files(paths))
    total = len(items) + len(errors)
    if not total:
        console.print("[red]no DICOM files found[/red]")
        raise typer.Exit(2)
    for text in errors:
        _error(text)
    failed = len(errors)
    ae = AE(ae_title=calling_ae or Settings().ae_title)
    with Progress(
        TextColumn("[bold]C-STORE"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("send", total=len(items))
        for keys, batch in _batches(items):
            contexts = [build_context(sop_class, _proposal(ts)) for sop_class, ts in keys]
            assoc: Association | None = None
            try:
                for n, item in enumerate(batch):
                    if assoc is None or not assoc.is_established:  # first file, or the peer dropped us
                        opened = _associate(ae, dest, contexts)
                        if isinstance(opened, str):
                            left = len(batch) - n
                            failed += left
                            _error(f"association with {dest} failed ({opened}); {left} file(s) not sent")
                            progress.advance(task, left)
                            break
                        assoc = opened
                    error = _store(assoc, item)
                    if error is not None:
                        failed += 1
                        _error(f"{item.path}: {error}")
                    progress.advance(task)
            finally:
                if assoc is not None and assoc.is_established:
                    assoc.release()
    console.print(
        f"sent {total - failed}/{total} to {dest}"
        + (f", {skipped} skipped (not DICOM, or a DICOMDIR)" if skipped else ""),
        soft_wrap=True,
    )
    if failed:
        raise typer.Exit(1)
