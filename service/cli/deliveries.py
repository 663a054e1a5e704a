"""``lusai deliveries``: look at the outbox and re-send what failed."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy import select

from service.cli.app import app
from service.core import lifecycle
from service.core.models import Delivery, DeliveryState
from service.core.runtime import Runtime
from service.core.settings import Settings

deliveries_app = typer.Typer(help="Result deliveries to PACS (the outbox).", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")
console = Console()


@deliveries_app.command("list")
def list_(
    state: Annotated[DeliveryState | None, typer.Option(help="Only this state.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
) -> None:
    """Newest deliveries first."""
    with Runtime.from_settings(Settings()) as runtime, runtime.db.session() as s:
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
    """Reset deliveries to pending with a fresh attempt budget and queue them now.

    A delivery being sent right now is left alone (as the API's re-send refuses it).
    """
    with Runtime.from_settings(Settings()) as runtime:
        with runtime.db.session() as s:
            q = select(Delivery.id)
            q = q.where(Delivery.id.in_(ids)) if ids else q.where(Delivery.state == state)
            if destination:
                q = q.where(Delivery.destination == destination)
            matched = list(s.scalars(q))
            chosen = [delivery_id for delivery_id in matched if lifecycle.resend(s, delivery_id)]
        for delivery_id in chosen:
            runtime.queue.enqueue_delivery(delivery_id)
    console.print(f"re-queued {len(chosen)} deliveries")
    if busy := sorted(set(matched) - set(chosen)):
        console.print(f"skipped {len(busy)} being sent right now: {', '.join(map(str, busy))}")
