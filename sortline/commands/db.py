"""``sortline db``: schema migrations."""

from __future__ import annotations

import click

from db.config import get_db_settings, mask_url


@click.group()
def db() -> None:
    """Manage the database schema (SORTLINE_DATABASE_URL)."""


@db.command()
@click.option("--revision", default="head", show_default=True, help="Target migration.")
def upgrade(revision: str) -> None:
    """Create or upgrade the tables to the newest schema."""
    from db.migrate import upgrade as run_upgrade

    url = get_db_settings().database_url
    run_upgrade(url, revision)
    click.echo(f"database {mask_url(url)} is at {revision}")
