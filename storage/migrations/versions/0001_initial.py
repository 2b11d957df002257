"""Initial schema: fingerprints, studies, configs, predictions, trials, per-stage memory.

Revision ID: 0001
Revises:
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

HASH = sa.String(64)
NAME = sa.String(255)


def upgrade() -> None:
    op.create_table(
        "autotune_fingerprints",
        sa.Column("hash", HASH, primary_key=True),
        sa.Column("info", sa.JSON(), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "autotune_studies",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("name", NAME, nullable=False, unique=True),
        sa.Column("space", sa.JSON(), nullable=False),
        sa.Column("model", NAME, nullable=False),
        sa.Column("cluster", NAME, nullable=False),
        sa.Column("fingerprint_hash", HASH, sa.ForeignKey("autotune_fingerprints.hash"), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
    )
    op.create_table(
        "autotune_configs",
        sa.Column("hash", HASH, primary_key=True),
        sa.Column("config", sa.JSON(), nullable=False),
    )
    op.create_table(
        "autotune_predictions",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("autotune_studies.id"), nullable=False),
        sa.Column("config_hash", HASH, sa.ForeignKey("autotune_configs.hash"), nullable=False),
        sa.Column("predicted", sa.JSON(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.UniqueConstraint("study_id", "rank", name="uq_autotune_predictions_study_rank"),
    )
    _create_trials()
    op.create_table(
        "autotune_trial_stages",
        sa.Column("trial_id", sa.Integer(), sa.ForeignKey("autotune_trials.id"), primary_key=True),
        sa.Column("stage", sa.Integer(), primary_key=True),
        sa.Column("peak_activation_bytes", sa.BigInteger(), nullable=True),
        sa.Column("peak_memory_bytes", sa.BigInteger(), nullable=True),
        sa.Column("evicted_bytes", sa.BigInteger(), nullable=True),
    )


def _create_trials() -> None:
    op.create_table(
        "autotune_trials",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("study_id", sa.Integer(), sa.ForeignKey("autotune_studies.id"), nullable=False),
        sa.Column("config_hash", HASH, sa.ForeignKey("autotune_configs.hash"), nullable=False),
        sa.Column("fingerprint_hash", HASH, sa.ForeignKey("autotune_fingerprints.hash"), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("step_time_s", sa.Float(), nullable=True),
        sa.Column("tokens_per_s", sa.Float(), nullable=True),
        sa.Column("mfu", sa.Float(), nullable=True),
        sa.Column("achieved_tflops", sa.Float(), nullable=True),
        sa.Column("losses", sa.JSON(), nullable=True),
        sa.Column("predicted", sa.JSON(), nullable=True),
        sa.Column("optuna_number", sa.Integer(), nullable=True),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("worker", NAME, nullable=True),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("finished_at", sa.DateTime(), nullable=True),
    )
    op.create_index("ix_autotune_trials_study_status", "autotune_trials", ["study_id", "status"])
    op.create_index(
        "ix_autotune_trials_config_fingerprint", "autotune_trials", ["config_hash", "fingerprint_hash"]
    )


def downgrade() -> None:
    for table in ("trial_stages", "trials", "predictions", "configs", "studies", "fingerprints"):
        op.drop_table(f"autotune_{table}")
