"""``lusai db``: schema migrations (Alembic)."""

from __future__ import annotations

from typing import Annotated

import typer

from service.cli.app import app
from service.core.settings import Settings

db_app = typer.Typer(help="Database schema migrations.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Migrate the database in LUSAI_DATABASE_URL up to REVISION."""
    from migrations.runner import upgrade

    s = Settings()
    s.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade(s.db_url, revision)


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "base") -> None:
    """Migrate the database down to REVISION (base drops every table)."""
    from migrations.runner import downgrade

    downgrade(Settings().db_url, revision)
