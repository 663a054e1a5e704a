"""``lusai send``: C-STORE files or folders to a DICOM peer, for administrators testing routes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pydicom
import typer
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from service.cli.app import app
from service.settings import Destination, get_settings

console = Console(stderr=True)


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
    datasets: list[tuple[Path, pydicom.Dataset]] = []
    skipped = 0
    for f in _files(paths):
        try:
            datasets.append((f, pydicom.dcmread(f, stop_before_pixels=False, defer_size=1024)))
        except (InvalidDicomError, OSError, ValueError):
            skipped += 1
    if not datasets:
        console.print("[red]no DICOM files found[/red]")
        raise typer.Exit(2)
    ae = AE(ae_title=calling_ae or get_settings().ae_title)
    contexts = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for _, ds in datasets}
    if len(contexts) > 128:
        console.print("[red]more than 128 SOP class/transfer syntax pairs; send in batches[/red]")
        raise typer.Exit(2)
    for sop_class, ts in sorted(contexts):
        ae.add_requested_context(
            sop_class, list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian]))
        )
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        console.print(f"[red]association with {dest} failed[/red]")
        raise typer.Exit(1)
    failed = 0
    try:
        with Progress(
            TextColumn("[bold]C-STORE"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("send", total=len(datasets))
            for path, ds in datasets:
                status = assoc.send_c_store(ds)
                code = int(status.Status) if status and "Status" in status else -1
                if code not in (0x0000, 0xB000, 0xB006, 0xB007):
                    failed += 1
                    console.print(
                        f"[yellow]{path.name}: status {'none' if code < 0 else f'0x{code:04X}'}[/yellow]"
                    )
                progress.advance(task)
    finally:
        assoc.release()
    console.print(
        f"sent {len(datasets) - failed}/{len(datasets)} to {dest}"
        + (f", {skipped} non-DICOM skipped" if skipped else "")
    )
    if failed:
        raise typer.Exit(1)
