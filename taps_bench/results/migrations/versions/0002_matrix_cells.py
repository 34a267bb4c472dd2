"""Matrix cells: one row per matrix cell with its last outcome (done or failed, and why).

Only adds a table, so releases from before migrations can still use the database: meta.schema_version stays "1".

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "matrix_cells",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("matrix", sa.String(255), nullable=False),
        sa.Column("cell", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text()),
        sa.Column("run_id", sa.Integer()),
        sa.Column("baseline_run_id", sa.Integer()),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_matrix_cells_key", "matrix_cells", ["key"], unique=True)
    op.create_index("ix_matrix_cells_matrix", "matrix_cells", ["matrix"])


def downgrade() -> None:
    op.drop_table("matrix_cells")
