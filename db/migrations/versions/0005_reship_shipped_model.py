"""register a re-shipped model file: the same path, a new version and new bytes

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 08:00:00

``models/sortline-trashnet.safetensors`` was re-shipped as 1.2.0 (the 1.1.0 weights with a
shift detector and shift temperature). An installation migrated before holds a row for the
old version whose file bytes are gone (its sha256 no longer matches, so it cannot load). The
new version is registered; it becomes active only where the stale shipped row was active (a
worker would otherwise fail to load the active model) or none is. An active model of the
user's own stays active, and the new version waits as a candidate.
"""

import hashlib
import importlib.util
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_spec = importlib.util.spec_from_file_location(
    "sortline_migration_0002", Path(__file__).with_name("0002_register_shipped_model.py")
)
assert _spec and _spec.loader
_0002 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_0002)
SHIPPED = _0002.SHIPPED


def upgrade() -> None:
    meta = _0002._shipped_meta()
    if meta is None:
        return
    conn = op.get_bind()
    models = _0002._models_table()
    count = _0002._count
    if count(conn, models, models.c.name == meta["name"], models.c.version == meta["version"]):
        return
    sha = hashlib.sha256(SHIPPED.read_bytes()).hexdigest()
    stale_active = count(
        conn, models, models.c.path == str(SHIPPED), models.c.sha256 != sha, models.c.active.is_(True)
    )
    any_active = count(conn, models, models.c.active.is_(True))
    activate = bool(stale_active) or not any_active
    if activate:
        op.execute(models.update().where(models.c.active.is_(True)).values(active=False))
    op.bulk_insert(models, [{
        "name": meta["name"], "version": meta["version"], "arch": meta["arch"],
        "path": str(SHIPPED), "sha256": sha, "classes": meta["classes"],
        "metrics": meta.get("metrics", {}), "active": activate, "created_at": datetime.now(UTC),
    }])  # fmt: skip


def downgrade() -> None:
    """Nothing to undo that is safe: the row may be the only one that loads."""
