"""results.unfamiliarity and results.unfamiliar

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 04:30:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.add_column(sa.Column("unfamiliarity", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("unfamiliar", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("results", schema=None) as batch_op:
        batch_op.drop_column("unfamiliar")
        batch_op.drop_column("unfamiliarity")
