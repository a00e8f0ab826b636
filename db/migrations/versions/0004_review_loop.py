"""The review loop: the uncertain outcome, reviews (human labels), and retraining's churn.

Results and faces say whether a label is below its class's calibrated threshold (`uncertain`)
and keep the runner-up class; the ledger gets the item state `uncertain`; `reviews` stores every
human verdict; retraining runs record the reviewed items they used, their label churn on an
archive sample, and the decision `held` (better, but changing too many labels to promote alone).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 13:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

OLD_ITEM_STATES = ("pending", "labeled", "no_face", "failed", "skipped")
NEW_ITEM_STATES = ("pending", "labeled", "uncertain", "no_face", "failed", "skipped")
OLD_DECISIONS = ("promoted", "rejected", "failed")
NEW_DECISIONS = ("promoted", "rejected", "held", "failed")


def _in(column: str, values: Sequence[str]) -> str:
    return f"{column} IN (" + ", ".join(f"'{value}'" for value in values) + ")"


def _uncertainty_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("uncertain", sa.Boolean(), server_default=sa.false(), nullable=False),
        sa.Column("runner_up", sa.String(length=128), nullable=True),
        sa.Column("runner_up_confidence", sa.Float(), nullable=True),
    ]


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table("job_items") as batch:
        batch.drop_constraint(op.f("ck_job_items_item_state"), type_="check")
        batch.create_check_constraint(
            op.f("ck_job_items_item_state"), _in("state", NEW_ITEM_STATES)
        )
    for table in ("results", "faces"):
        with op.batch_alter_table(table) as batch:
            for column in _uncertainty_columns():
                batch.add_column(column)
    with op.batch_alter_table("retrain_runs") as batch:
        batch.drop_constraint(op.f("ck_retrain_runs_retrain_decision"), type_="check")
        batch.create_check_constraint(
            op.f("ck_retrain_runs_retrain_decision"), _in("decision", NEW_DECISIONS)
        )
        batch.add_column(
            sa.Column("reviewed_items", sa.Integer(), server_default=sa.text("0"), nullable=False)
        )
        batch.add_column(
            sa.Column(
                "churn",
                sa.JSON().with_variant(postgresql.JSONB(), "postgresql"),
                server_default=sa.text("'{}'"),
                nullable=False,
            )
        )
    op.create_table(
        "reviews",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("image_id", sa.BigInteger(), nullable=False),
        sa.Column("face_index", sa.Integer(), nullable=True),
        sa.Column("model_version", sa.String(length=128), nullable=False),
        sa.Column("old_label", sa.String(length=128), nullable=True),
        sa.Column("new_label", sa.String(length=128), nullable=False),
        sa.Column("reviewer", sa.String(length=128), nullable=False),
        sa.Column("job_id", sa.BigInteger(), nullable=True),
        sa.Column("fingerprint", sa.String(length=128), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["image_id"], ["images.id"], name=op.f("fk_reviews_image_id_images"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_reviews_job_id_jobs"), ondelete="SET NULL"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reviews")),
    )
    with op.batch_alter_table("reviews") as batch:
        batch.create_index("ix_reviews_image_id_face_index", ["image_id", "face_index"])


def downgrade() -> None:
    """Downgrade schema: reviews and churn go; uncertain ledger rows become labeled."""
    with op.batch_alter_table("reviews") as batch:
        batch.drop_index("ix_reviews_image_id_face_index")
    op.drop_table("reviews")
    op.execute("UPDATE retrain_runs SET decision = 'rejected' WHERE decision = 'held'")
    with op.batch_alter_table("retrain_runs") as batch:
        batch.drop_column("churn")
        batch.drop_column("reviewed_items")
        batch.drop_constraint(op.f("ck_retrain_runs_retrain_decision"), type_="check")
        batch.create_check_constraint(
            op.f("ck_retrain_runs_retrain_decision"), _in("decision", OLD_DECISIONS)
        )
    for table in ("faces", "results"):
        with op.batch_alter_table(table) as batch:
            for name in ("runner_up_confidence", "runner_up", "uncertain"):
                batch.drop_column(name)
    op.execute("UPDATE job_items SET state = 'labeled' WHERE state = 'uncertain'")
    with op.batch_alter_table("job_items") as batch:
        batch.drop_constraint(op.f("ck_job_items_item_state"), type_="check")
        batch.create_check_constraint(
            op.f("ck_job_items_item_state"), _in("state", OLD_ITEM_STATES)
        )
