"""`job_items` without foreign keys: the scan's insert no longer runs two checks per row.

Every row a scan puts in the ledger fired two foreign-key triggers, one looking up (and
locking) its image and one its job. Those checks are most of what a scan costs the server
after the rows themselves. They guard against nothing the code can do: `job_items` is
written by the scan alone (`add_job_items`), with image ids the same transaction has just
upserted (`record_images`) and a job whose row the same transaction holds locked
(`allocate_chunk_indices`); images and jobs are never deleted, and `retention` deletes
ledger rows, never jobs. The first scan of 1,000,000 files on PostgreSQL: bench/RESULTS.md,
"The ledger's insert without foreign-key checks".

On SQLite the table is rebuilt (batch mode): once, in the upgrade, a few seconds per million
ledger rows. On PostgreSQL the constraints are dropped in place.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 04:30:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_KEYS = (
    ("fk_job_items_image_id_images", "images", "image_id"),
    ("fk_job_items_job_id_jobs", "jobs", "job_id"),
)


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("job_items") as batch:
        for name, _, _ in _KEYS:
            batch.drop_constraint(name, type_="foreignkey")


def downgrade() -> None:
    """Downgrade schema (refused by the database if a ledger row names a missing image or job)."""
    with op.batch_alter_table("job_items") as batch:
        for name, table, column in _KEYS:
            batch.create_foreign_key(name, table, [column], ["id"], ondelete="CASCADE")
