"""output audit: results record the dicom3tools audit of their SEG/SR/SC

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 02:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Results written before were checked by dicom3tools before they were stored: "inline".
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("output_audit", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("output_audit_detail", sa.String(length=200), nullable=True))
    op.execute("UPDATE results SET output_audit = 'inline'")


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("output_audit_detail")
        batch_op.drop_column("output_audit")
