"""``lusai check ROLE``: container health checks, exit 0 when the role on this host answers."""

from __future__ import annotations

import ssl
from enum import StrEnum
from typing import Annotated

import typer

from service.cli.app import app
from service.core.settings import Settings


class Role(StrEnum):
    api = "api"
    scp = "scp"
    worker = "worker"


def c_echo(
    host: str, port: int, called_ae: str, calling_ae: str = "LUSAI-CHECK", tls: ssl.SSLContext | None = None
) -> bool:
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification SOP Class
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    tls_args = (tls, "localhost") if tls is not None else None  # SNI only: the name is not checked
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=tls_args)
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def _probe_ae(s: Settings) -> str:
    """A calling AE title the SCP admits: the first of its allow-list (an empty list admits any
    loopback caller; '*' any caller), so the check does not fail on the SCP's own policy."""
    allowed = [ae for ae in s.allowed_calling_aes if ae != "*"]
    return allowed[0] if allowed else s.ae_title


def _probe_tls(s: Settings) -> ssl.SSLContext | None:
    """TLS when the SCP speaks it: our own certificate as the client's (mutual TLS admits it when
    the site's CA signed it); the server is this host's, reached on loopback, so its name is not
    checked."""
    if s.dicom_tls_cert is None or s.dicom_tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.load_cert_chain(str(s.dicom_tls_cert), str(s.dicom_tls_key))
    return context


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
        ok = c_echo("127.0.0.1", s.dicom_port, s.ae_title, calling_ae=_probe_ae(s), tls=_probe_tls(s))
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
