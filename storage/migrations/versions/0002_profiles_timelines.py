"""Layer profiles, trial timelines, and the predicted peak memory beside each measured stage.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "autotune_profiles",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column(
            "fingerprint_hash", sa.String(64), sa.ForeignKey("autotune_fingerprints.hash"), nullable=False
        ),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("profile", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_index(
        "ix_autotune_profiles_fingerprint_model", "autotune_profiles", ["fingerprint_hash", "model"]
    )
    op.create_table(
        "autotune_timelines",
        sa.Column("trial_id", sa.Integer(), sa.ForeignKey("autotune_trials.id"), primary_key=True),
        sa.Column("timeline", sa.JSON(), nullable=False),
    )
    with op.batch_alter_table("autotune_trial_stages") as batch:
        batch.add_column(sa.Column("predicted_peak_memory_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("autotune_trial_stages") as batch:
        batch.drop_column("predicted_peak_memory_bytes")
    op.drop_table("autotune_timelines")
    op.drop_index("ix_autotune_profiles_fingerprint_model", table_name="autotune_profiles")
    op.drop_table("autotune_profiles")
