"""The tables of the first release (meta.schema_version "1"): meta, runs, samples.

Exactly what that release's `create_all` produced, so that a database it wrote can be stamped 0001 and upgraded.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    meta = op.create_table(
        "meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text(), nullable=False),
    )
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("task", sa.String(255), nullable=False),
        sa.Column("proposer", sa.String(255), nullable=False),
        sa.Column("temperature", sa.Float(), nullable=False),
        sa.Column("settings", sa.JSON(), nullable=False),
        sa.Column("provenance", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_runs_key", "runs", ["key"], unique=True)
    op.create_index("ix_runs_target", "runs", ["target"])
    op.create_index("ix_runs_task", "runs", ["task"])
    op.create_table(
        "samples",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("run_id", sa.Integer(), sa.ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("example_id", sa.String(255), nullable=False),
        sa.Column("turn", sa.Integer(), nullable=False),
        sa.Column("prompt_hash", sa.String(64)),
        sa.Column("prompt_tokens", sa.Integer()),
        sa.Column("output_ids", sa.JSON(), nullable=False),
        sa.Column("output_hash", sa.String(64), nullable=False),
        sa.Column("output_text", sa.Text()),
        sa.Column("new_tokens", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("accept_lengths", sa.JSON(), nullable=False),
        sa.Column("drafted_by_depth", sa.JSON(), nullable=False),
        sa.Column("accepted_by_depth", sa.JSON(), nullable=False),
        sa.Column("tree_sizes", sa.JSON(), nullable=False),
        sa.Column("prefill_s", sa.Float(), nullable=False),
        sa.Column("draft_s", sa.Float(), nullable=False),
        sa.Column("verify_s", sa.Float(), nullable=False),
        sa.Column("total_s", sa.Float(), nullable=False),
        sa.Column("stop_reason", sa.String(32), nullable=False),
        sa.Column("extracted", sa.Text()),
        sa.Column("gold", sa.Text()),
        sa.Column("correct", sa.Boolean()),
        sa.Column("lossless", sa.Boolean()),
        sa.Column("extra", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.UniqueConstraint("run_id", "example_id", "turn", name="uq_sample_run_example_turn"),
    )
    op.create_index("ix_samples_run_id", "samples", ["run_id"])
    # That release wrote this row on first open, and releases of its line refuse any other value.
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def downgrade() -> None:
    op.drop_table("samples")
    op.drop_table("runs")
    op.drop_table("meta")
