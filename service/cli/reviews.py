"""``lusai reviews``: the readers' scores, and their export as the labels of ``lusai adapt``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from service.cli.app import app
from service.core.models import Review
from service.core.reviews import label_rows, pseudonym_key, write_labels
from service.core.runtime import Runtime
from service.core.settings import Settings

reviews_app = typer.Typer(help="Readers' reviews of results.", no_args_is_help=True)
app.add_typer(reviews_app, name="reviews")
console = Console()


def _since(value: str | None) -> datetime | None:
    """A date or date-time (ISO 8601); naive values are UTC, like the API's filters."""
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"not an ISO 8601 date: {value!r}", param_hint="--since") from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


@reviews_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="Labels CSV to write (for `lusai adapt --labels`).")],
    since: Annotated[str | None, typer.Option(help="Only reviews recorded on or after (ISO 8601).")] = None,
    model_version: Annotated[
        str | None, typer.Option(help="Only reviews of results of this model version.")
    ] = None,
) -> None:
    """Write the labels CSV of `lusai adapt`: one row per SOP instance, its latest review.

    Patient IDs become keyed pseudonyms (LUSAI_PSEUDONYM_KEY). Clips whose latest review says "not
    gradable" are left out: they have no score to learn from.
    """
    when = _since(since)
    if not out.parent.is_dir():
        raise typer.BadParameter(f"folder does not exist: {out.parent}", param_hint="--out")
    with Runtime.from_settings(Settings()) as runtime:
        key = pseudonym_key(runtime.settings)
        with runtime.db.session() as s:
            labels = label_rows(s, key, since=when, model_version=model_version)
    write_labels(out, labels.rows)
    console.print(
        f"wrote {len(labels.rows)} labels to {out}"
        + (f" ({labels.not_gradable} not gradable left out)" if labels.not_gradable else ""),
        soft_wrap=True,
    )


@reviews_app.command("list")
def list_(
    limit: Annotated[int, typer.Option(min=1, max=10000)] = 50,
    reviewer: Annotated[str | None, typer.Option(help="Only this reviewer (principal name).")] = None,
) -> None:
    """Newest reviews first, with the model's score beside the reader's."""
    from service.api.queries.reviews import select_reviews  # the API's query; FastAPI only when used
    from service.api.schemas import ReviewFilter

    # model_construct: a filter, not input to check (any stored reviewer name can be asked for).
    which = ReviewFilter.model_construct(reviewer=reviewer)
    with Runtime.from_settings(Settings()) as runtime, runtime.db.session() as s:
        q = select_reviews(which).order_by(Review.id.desc()).limit(limit)
        table = Table("id", "result", "instance", "reviewer", "reader", "model", "model version", "at")
        for row in s.execute(q):
            rv = row.Review
            table.add_row(
                str(rv.id),
                str(rv.result_id),
                row.sop_instance_uid,
                rv.reviewer,
                "not gradable" if rv.score is None else str(rv.score),
                "not graded" if row.score is None else str(row.score),
                row.model_version,
                rv.created_at.isoformat(timespec="seconds"),
            )
    console.print(table)
