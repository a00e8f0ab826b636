"""Retention: a job whose ledger rows were pruned keeps its counts.

`emolabel prune` deletes the job_items and chunks of jobs finished long ago (they are most of
the database at archive scale); the job row stays, with `pruned_at` and `summary` (the counts
by state and by (state, reason) as they were), so `status` still tells what the job did.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 00:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column(
                "summary", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True
            )
        )


def downgrade() -> None:
    """Downgrade schema: the summaries go (the pruned rows do not come back)."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("summary")
        batch.drop_column("pruned_at")
