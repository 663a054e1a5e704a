"""delivery order: deliveries record their study, so one study's outputs reach PACS in order

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-09 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Rows written before: their study through result -> instance -> series -> study.
_BACKFILL = """
UPDATE deliveries SET study_uid = (
    SELECT st.study_instance_uid FROM results r
    JOIN instances i ON i.id = r.instance_id
    JOIN series se ON se.id = i.series_id
    JOIN studies st ON st.id = se.study_id
    WHERE r.id = deliveries.result_id
)
"""


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("study_uid", sa.String(length=64), nullable=True))
        batch_op.create_index("ix_deliveries_destination_study", ["destination", "study_uid"], unique=False)
    op.execute(_BACKFILL)


def downgrade() -> None:
    # A 'waiting' delivery would be stuck without the order rule that releases it: send it again.
    op.execute("UPDATE deliveries SET state = 'pending' WHERE state = 'waiting'")
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_destination_study")
        batch_op.drop_column("study_uid")
