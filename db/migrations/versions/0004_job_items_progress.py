"""what each job sent, and when it last made progress (reconciling lost messages)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 04:10:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("resends", sa.Integer(), nullable=False, server_default=sa.text("0"))
        )
    op.create_table(
        "job_items",
        sa.Column("job_id", sa.String(length=32), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("path", sa.LargeBinary(), nullable=True),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("job_id", "position"),
    )


def downgrade() -> None:
    op.drop_table("job_items")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resends")
        batch.drop_column("progress_at")
