"""Faces: one row per face a face model labeled; results.face_count; job item state no_face.

A face model's image is labeled with its faces (results.face_count > 0, the photo-level label the
largest face's) or decided as no_face (face_count 0, label and confidence NULL). Rows written
before this revision are whole-image labels: their face_count stays NULL.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-18 10:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_ITEM_STATES = ("pending", "labeled", "failed", "skipped")
NEW_ITEM_STATES = ("pending", "labeled", "no_face", "failed", "skipped")
RESULTS_LABEL_CHECK = (
    "(face_count = 0 AND label IS NULL AND confidence IS NULL)"
    " OR (label IS NOT NULL AND confidence IS NOT NULL"
    " AND (face_count IS NULL OR face_count > 0))"
)


def _states(values: Sequence[str]) -> str:
    return "state IN (" + ", ".join(f"'{value}'" for value in values) + ")"


def upgrade() -> None:
    """Upgrade schema."""
    # Statuses are VARCHAR with a CHECK constraint (never a native enum): replace the check.
    # On SQLite the batch recreates the table and copies its rows.
    with op.batch_alter_table("job_items") as batch:
        batch.drop_constraint(op.f("ck_job_items_item_state"), type_="check")
        batch.create_check_constraint(op.f("ck_job_items_item_state"), _states(NEW_ITEM_STATES))
    with op.batch_alter_table("results") as batch:
        batch.add_column(sa.Column("face_count", sa.Integer(), nullable=True))
        batch.alter_column("label", existing_type=sa.String(length=128), nullable=True)
        batch.alter_column("confidence", existing_type=sa.Float(), nullable=True)
        batch.create_check_constraint(
            op.f("ck_results_label_unless_no_face"), sa.text(RESULTS_LABEL_CHECK)
        )
    op.create_table(
        "faces",
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("face_index", sa.Integer(), nullable=False),
        sa.Column("x", sa.Integer(), nullable=False),
        sa.Column("y", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("detector_score", sa.Float(), nullable=False),
        sa.Column("label", sa.String(length=128), nullable=False),
        sa.Column("confidence", sa.Float(), nullable=False),
        sa.Column(
            "scores", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
        ),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "width > 0 AND height > 0 AND x >= 0 AND y >= 0", name=op.f("ck_faces_box")
        ),
        sa.ForeignKeyConstraint(
            ["image_id", "model_version"],
            ["results.image_id", "results.model_version"],
            name=op.f("fk_faces_image_id_results"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_faces_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("image_id", "model_version", "face_index", name=op.f("pk_faces")),
    )
    with op.batch_alter_table("faces") as batch:
        batch.create_index(batch.f("ix_faces_job_id"), ["job_id"], unique=False)


def downgrade() -> None:
    """Downgrade schema: faces, face-model results without a label and no_face rows go.

    A no_face ledger row becomes skipped (reason no_face): the old states cannot say it.
    """
    with op.batch_alter_table("faces") as batch:
        batch.drop_index(batch.f("ix_faces_job_id"))
    op.drop_table("faces")
    op.execute("DELETE FROM results WHERE label IS NULL")
    with op.batch_alter_table("results") as batch:
        batch.drop_constraint(op.f("ck_results_label_unless_no_face"), type_="check")
        batch.alter_column("confidence", existing_type=sa.Float(), nullable=False)
        batch.alter_column("label", existing_type=sa.String(length=128), nullable=False)
        batch.drop_column("face_count")
    op.execute("UPDATE job_items SET state = 'skipped', reason = 'no_face' WHERE state = 'no_face'")
    with op.batch_alter_table("job_items") as batch:
        batch.drop_constraint(op.f("ck_job_items_item_state"), type_="check")
        batch.create_check_constraint(op.f("ck_job_items_item_state"), _states(OLD_ITEM_STATES))
