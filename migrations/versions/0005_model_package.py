"""model package: results record the SHA-256 of the model package that produced them

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01 17:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Results from before model packages have none (NULL); their weights_sha256 still names the weights.
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_package_sha256", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("model_package_sha256")
