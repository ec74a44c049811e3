"""register the shipped model, so results.model_version joins models

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02 04:10:00

The shipped checkpoint (models/sortline-trashnet.safetensors) becomes a row of ``models``,
active if no other model is. Its header is read here rather than through
``training.model.checkpoint``: a migration is a snapshot and ``db`` never imports ``training``.
"""

import hashlib
import json
import struct
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

SHIPPED = Path(__file__).resolve().parents[3] / "models" / "sortline-trashnet.safetensors"


def _models_table() -> sa.Table:
    json_type = sa.JSON().with_variant(sa.dialects.postgresql.JSONB(), "postgresql")
    return sa.table(
        "models",
        sa.column("name", sa.String), sa.column("version", sa.String),
        sa.column("arch", sa.String), sa.column("path", sa.Text),
        sa.column("sha256", sa.String), sa.column("classes", json_type),
        sa.column("metrics", json_type), sa.column("active", sa.Boolean),
        sa.column("created_at", sa.DateTime(timezone=True)),
    )


def _shipped_meta() -> dict | None:
    if not SHIPPED.is_file():
        return None
    with open(SHIPPED, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"]["sortline"])


def _count(conn, models: sa.Table, *where) -> int:
    """Rows of ``models`` matching *where*."""
    return conn.execute(
        sa.select(sa.func.count()).select_from(models).where(*where)
    ).scalar()


def upgrade() -> None:
    meta = _shipped_meta()
    if meta is None:  # an installation without the shipped file
        return
    conn = op.get_bind()
    models = _models_table()
    if _count(conn, models, models.c.name == meta["name"], models.c.version == meta["version"]):
        return
    any_active = _count(conn, models, models.c.active.is_(True))
    op.bulk_insert(models, [{
        "name": meta["name"], "version": meta["version"], "arch": meta["arch"],
        "path": str(SHIPPED), "sha256": hashlib.sha256(SHIPPED.read_bytes()).hexdigest(),
        "classes": meta["classes"], "metrics": meta.get("metrics", {}),
        "active": not any_active, "created_at": datetime.now(UTC),
    }])


def downgrade() -> None:
    models = _models_table()
    op.execute(models.delete().where(models.c.path == str(SHIPPED)))
