"""previews: results record the storage keys of the previews the worker rendered next to the SEG

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = ("preview_png_key", "preview_gif_key", "preview_webp_key")


def upgrade() -> None:
    # Results analysed before have no previews (all NULL): the API asks to re-run the job rather
    # than render them itself.
    with op.batch_alter_table("results", schema=None) as batch_op:
        for name in _KEYS:
            batch_op.add_column(sa.Column(name, sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("preview_error", sa.String(length=200), nullable=True))


def downgrade() -> None:
    # The stored preview images stay in object storage, unreferenced, like any orphaned object.
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("preview_error")
        for name in reversed(_KEYS):
            batch_op.drop_column(name)
