"""Chunk numbers from the job row, producer heartbeat, crash counts, model hashes, refusals.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04 18:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("next_chunk_index", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(sa.Column("producer", sa.String(length=128), nullable=True))
        batch.add_column(sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=True))
    # Jobs made before this revision numbered their own chunks: continue after the highest.
    op.execute(
        "UPDATE jobs SET next_chunk_index = COALESCE("
        "(SELECT MAX(chunk_index) + 1 FROM chunks WHERE chunks.job_id = jobs.id), 0)"
    )
    with op.batch_alter_table("chunks") as batch:
        batch.add_column(
            sa.Column("crashes", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
    with op.batch_alter_table("model_versions") as batch:
        batch.add_column(sa.Column("model_sha256", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("metadata_sha256", sa.String(length=64), nullable=True))
    op.create_table(
        "refused_messages",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("chunk_index", sa.Integer(), nullable=True),
        sa.Column("task_id", sa.String(length=128), nullable=True),
        sa.Column("reason", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=True),
        sa.Column(
            "received_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_refused_messages")),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table("refused_messages")
    with op.batch_alter_table("model_versions") as batch:
        batch.drop_column("metadata_sha256")
        batch.drop_column("model_sha256")
    with op.batch_alter_table("chunks") as batch:
        batch.drop_column("crashes")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("heartbeat_at")
        batch.drop_column("producer")
        batch.drop_column("next_chunk_index")
