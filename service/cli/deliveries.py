"""``lusai deliveries``: look at the outbox and re-send what failed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from service.cli.app import app
from service.core.db import session_scope
from service.core.models import Delivery, DeliveryState
from service.core.outbox import reset_for_resend
from service.core.queue import enqueue_delivery
from service.core.settings import get_settings

deliveries_app = typer.Typer(help="Result deliveries to PACS (the outbox).", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")
console = Console()


@deliveries_app.command("list")
def list_(
    state: Annotated[DeliveryState | None, typer.Option(help="Only this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
) -> None:
    """Newest deliveries first."""
    with session_scope(get_settings().db_url) as s:
        q = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        if state is not None:
            q = q.where(Delivery.state == state)
        rows = s.scalars(q).all()
        table = Table("id", "destination", "object", "state", "attempts", "next attempt", "last error")
        for d in rows:
            table.add_row(
                str(d.id),
                d.destination,
                d.sop_instance_uid,
                d.state.value,
                str(d.attempts),
                d.next_attempt_at.isoformat(timespec="seconds") if d.next_attempt_at else "",
                (d.last_error or "")[:60],
            )
    console.print(table)


@deliveries_app.command("resend")
def resend(
    ids: Annotated[
        list[int] | None, typer.Argument(help="Delivery IDs (default: all matching --state).")
    ] = None,
    state: Annotated[
        DeliveryState, typer.Option(help="Which deliveries to re-send when no IDs are given.")
    ] = (DeliveryState.DEAD),
    destination: Annotated[str | None, typer.Option(help="Only this destination (AET@host:port).")] = None,
) -> None:
    """Reset deliveries to pending with a fresh attempt budget and queue them now."""
    with session_scope(get_settings().db_url) as s:
        q = select(Delivery)
        q = q.where(Delivery.id.in_(ids)) if ids else q.where(Delivery.state == state)
        if destination:
            q = q.where(Delivery.destination == destination)
        rows = s.scalars(q).all()
        for d in rows:
            reset_for_resend(d)
        chosen = [d.id for d in rows]
    for delivery_id in chosen:
        enqueue_delivery(delivery_id)
    console.print(f"re-queued {len(chosen)} deliveries")
