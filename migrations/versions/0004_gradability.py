"""gradability: a result may have no score, with the reason the cine could not be graded

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 16:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Every existing result was graded: the server default fills the new column for them.
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("gradable", sa.Boolean(), server_default=sa.true(), nullable=False))
        batch_op.add_column(sa.Column("ungradable_reason", sa.String(length=32), nullable=True))
        batch_op.alter_column("score", existing_type=sa.Integer(), nullable=True)
        batch_op.create_index(batch_op.f("ix_results_gradable"), ["gradable"], unique=False)


def downgrade() -> None:
    # A score is required again. Versions before 0004 called an unreadable clip 0, so that is what
    # those results become (their measurements JSON still says gradable: false and why).
    op.execute(sa.text("UPDATE results SET score = 0 WHERE score IS NULL"))
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_results_gradable"))
        batch_op.alter_column("score", existing_type=sa.Integer(), nullable=False)
        batch_op.drop_column("ungradable_reason")
        batch_op.drop_column("gradable")
