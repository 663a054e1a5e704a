"""``lusai check ROLE``: container health checks, exit 0 when the role on this host answers."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer

from service.cli.app import app
from service.core.settings import Settings


class Role(StrEnum):
    api = "api"
    scp = "scp"
    worker = "worker"


def c_echo(host: str, port: int, called_ae: str, calling_ae: str = "LUSAI-CHECK") -> bool:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification SOP Class
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


@app.command()
def check(role: Annotated[Role, typer.Argument(help="Which part to check.")]) -> None:
    """Health check for one role (used by Docker HEALTHCHECK and compose)."""
    s = Settings()
    ok = False
    if role is Role.api:
        import httpx

        try:
            ok = httpx.get(f"http://127.0.0.1:{s.api_port}/health/live", timeout=5).status_code == 200
        except httpx.HTTPError:
            ok = False
    elif role is Role.scp:
        ok = c_echo("127.0.0.1", s.dicom_port, s.ae_title, calling_ae=s.ae_title)
    else:
        from service.core.model_package import DEFAULT_PACKAGE, PackageError, load_package
        from service.core.runtime import Runtime

        try:
            with Runtime.from_settings(s) as runtime:
                runtime.db.ping()
                runtime.queue.ping()
            ok = True
        except Exception:
            ok = False
        try:  # the package the worker runs is still the one it verified at start
            load_package(s.model_path or DEFAULT_PACKAGE)
        except PackageError as exc:
            typer.echo(f"model package: {exc}", err=True)
            ok = False
    typer.echo("ok" if ok else "unhealthy")
    raise typer.Exit(0 if ok else 1)


@app.command()
def echo(
    to: Annotated[str, typer.Option("--to", help="Peer AET@host:port, or a DICOMweb service root URL.")],
) -> None:
    """C-ECHO a DICOM peer, or probe a DICOMweb destination the way the delivery sweep does
    (to test a route or a destination)."""
    from service.core.settings import Destination

    try:
        dest = Destination.parse(to)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--to") from exc
    settings = Settings()
    if dest.transport == "stowrs":
        from workers.deliver.dimse import DeliveryError
        from workers.deliver.stow import web_echo

        try:
            web_echo(dest, settings)
            ok, how = True, "success"
        except DeliveryError as exc:
            ok, how = False, f"failed ({exc})"
        typer.echo(f"DICOMweb {dest}: {how}")
        raise typer.Exit(0 if ok else 1)
    ok = c_echo(dest.host, dest.port, dest.ae_title, calling_ae=settings.ae_title)
    typer.echo(f"C-ECHO {dest}: {'success' if ok else 'failed'}")
    raise typer.Exit(0 if ok else 1)
