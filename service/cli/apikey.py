"""``lusai apikey``: create, list and revoke REST API keys (the token is shown once, never stored)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from service.cli.app import app
from service.core.runtime import Runtime
from service.core.settings import Settings

apikey_app = typer.Typer(help="REST API keys.", no_args_is_help=True)
app.add_typer(apikey_app, name="apikey")
console = Console()
if not console.is_terminal:  # pipes and logs: never truncate key ids
    console = Console(width=200)


@apikey_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key (shown in the audit log).")],
    scope: Annotated[
        list[str] | None,
        typer.Option("--scope", "-s", help="read, write or admin (repeatable; default: read)"),
    ] = None,
    rate_limit: Annotated[
        int | None, typer.Option(help="Requests/minute (0: unlimited; default LUSAI_API_RATE_LIMIT)")
    ] = None,
    expires_days: Annotated[int | None, typer.Option(help="Expire after this many days.")] = None,
) -> None:
    """Create a key and print its token once; store it in the integrator's secret store."""
    from service.api.auth import create_api_key

    scope = scope or ["read"]
    if len(name) > 64:
        raise typer.BadParameter("at most 64 characters", param_hint="NAME")
    expires = datetime.now(UTC) + timedelta(days=expires_days) if expires_days else None
    try:
        with Runtime.from_settings(Settings()) as runtime, runtime.db.session() as session:
            row, token = create_api_key(session, name, scope, rate_limit=rate_limit, expires_at=expires)
            key_id = row.key_id
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--scope") from exc
    scopes = ", ".join(sorted(set(scope)))
    console.print(f"key id {key_id} ({scopes}); the token is shown only now:", style="bold")
    typer.echo(token)


@apikey_app.command("list")
def list_keys() -> None:
    """Keys with their scopes and state (never the secrets)."""
    from service.core.models import ApiKey

    table = Table()
    for col in ("key id", "name", "scopes", "rate/min", "created", "expires", "revoked"):
        table.add_column(col, no_wrap=True)
    with Runtime.from_settings(Settings()) as runtime, runtime.db.session() as session:
        for k in session.scalars(select(ApiKey).order_by(ApiKey.id)):
            table.add_row(
                k.key_id,
                k.name,
                ",".join(k.scopes or []),
                "default" if k.rate_limit is None else str(k.rate_limit),
                f"{k.created_at:%Y-%m-%d}",
                f"{k.expires_at:%Y-%m-%d}" if k.expires_at else "",
                f"{k.revoked_at:%Y-%m-%d %H:%M}" if k.revoked_at else "",
            )
    console.print(table)


@apikey_app.command("revoke")
def revoke(key_id: Annotated[str, typer.Argument(help="The key id shown by create/list.")]) -> None:
    """Revoke a key (running API processes stop accepting it within LUSAI_API_KEY_CACHE_SECONDS)."""
    from service.core.models import ApiKey

    with Runtime.from_settings(Settings()) as runtime, runtime.db.session() as session:
        row = session.scalar(select(ApiKey).where(ApiKey.key_id == key_id))
        if row is None:
            console.print(f"no key {key_id}", style="red")
            raise typer.Exit(1)
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
    console.print(f"revoked {key_id}")
