"""reviews: readers' own scores beside the model's results

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("result_id", sa.Integer(), nullable=False),
        sa.Column("instance_id", sa.Integer(), nullable=False),
        sa.Column("reviewer", sa.String(length=160), nullable=False),
        sa.Column("score", sa.Integer(), nullable=True),
        sa.Column("gradable", sa.Boolean(), nullable=False),
        sa.Column("a_lines", sa.Boolean(), nullable=True),
        sa.Column("b_lines", sa.Boolean(), nullable=True),
        sa.Column("pleura_irregular", sa.Boolean(), nullable=True),
        sa.Column("consolidation", sa.Boolean(), nullable=True),
        sa.Column("effusion", sa.Boolean(), nullable=True),
        sa.Column("comments", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["instance_id"], ["instances.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["result_id"], ["results.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_reviews_created_at"), ["created_at"], unique=False)
        batch_op.create_index(batch_op.f("ix_reviews_instance_id"), ["instance_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reviews_result_id"), ["result_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_reviews_reviewer"), ["reviewer"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("reviews", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_reviews_reviewer"))
        batch_op.drop_index(batch_op.f("ix_reviews_result_id"))
        batch_op.drop_index(batch_op.f("ix_reviews_instance_id"))
        batch_op.drop_index(batch_op.f("ix_reviews_created_at"))
    op.drop_table("reviews")
