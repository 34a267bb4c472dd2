"""Submissions: one row per imported result bundle, and `runs.submission_id` tying each imported run to its bundle.

Adds a table and a nullable column, so releases from before migrations can still use the database:
meta.schema_version stays "1".

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "submissions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("bundle_sha256", sa.String(64), nullable=False),
        sa.Column("name", sa.String(255), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("verification", sa.JSON()),
        sa.Column("imported_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_submissions_bundle_sha256", "submissions", ["bundle_sha256"], unique=True)
    op.create_index("ix_submissions_name", "submissions", ["name"])
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("submission_id", sa.Integer(), nullable=True))
        batch.create_foreign_key("fk_runs_submission_id_submissions", "submissions", ["submission_id"], ["id"])
        batch.create_index("ix_runs_submission_id", ["submission_id"])


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_index("ix_runs_submission_id")
        batch.drop_constraint("fk_runs_submission_id_submissions", type_="foreignkey")
        batch.drop_column("submission_id")
    op.drop_table("submissions")
