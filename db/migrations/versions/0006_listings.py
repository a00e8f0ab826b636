"""Listings: a rescan of an unchanged folder reads nothing and itemizes nothing.

`listings` keeps, per run of files in one folder, the digest of its listing and the model
version that had settled every file in it; `jobs.unread` counts by reason the files a scan
counted from such runs instead of writing a ledger row each.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 07:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "listings",
        sa.Column("key", sa.String(length=32), nullable=False),
        sa.Column("digest", sa.String(length=32), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("counts", _JSON, nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("(CURRENT_TIMESTAMP)"),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_listings")),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("unread", _JSON, nullable=True))


def downgrade() -> None:
    """Downgrade schema: rescans itemize every file again."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("unread")
    op.drop_table("listings")
