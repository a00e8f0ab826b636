"""An index on `job_items.image_id`: an image's ledger rows found without reading the ledger.

The primary key is (job_id, image_id), so a lookup by image (the scan's "failed before and
unchanged since" check, for each batch of 2,048 files; `--where` selections; an image's latest
outcome) read every ledger row: each batch of a scan cost more as the ledger grew. A first scan
of 1,000,000 files on SQLite ran at 8,896 files/s without it and 15,927 with it
(`python -m bench.producer`, bench/RESULTS.md).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06 20:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_index("ix_job_items_image_id", "job_items", ["image_id"])


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_job_items_image_id", table_name="job_items")
