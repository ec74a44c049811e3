"""``sortline models``: the registered model versions, and which one the workers load."""

from __future__ import annotations

import json

import click


def activate(ref: str, *, force: bool = False) -> str:
    """Make the registered model *ref* (``NAME:VERSION``) the active one; return a line saying so."""
    from db.config import get_db_settings
    from db.engine import session_scope
    from db.migrate import ensure_schema
    from db.service import activate_model

    ensure_schema()
    with session_scope() as s:
        rec = activate_model(s, ref=ref, floor=get_db_settings().promotion_floor, force=force)
        return (
            f"{rec.name}:{rec.version} is the active model; workers load it before their next task"
        )


def _score(metrics: dict, split: str, key: str) -> str:
    value = (metrics.get(split) or {}).get(key)
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per model.")
@click.pass_context
def models(ctx: click.Context, as_json: bool) -> None:
    """List the registered model versions with their metrics; * marks the active one."""
    if ctx.invoked_subcommand is not None:
        return
    from db.engine import session_scope
    from db.migrate import ensure_schema
    from db.service import list_models

    ensure_schema()
    with session_scope() as s:
        recs = list_models(s)
        if as_json:
            for r in recs:
                click.echo(
                    json.dumps(
                        {
                            "model": f"{r.name}:{r.version}",
                            "active": r.active,
                            "arch": r.arch,
                            "path": r.path,
                            "sha256": r.sha256,
                            "created_at": r.created_at.isoformat(),
                            "val": r.metrics.get("val"),
                            "test": r.metrics.get("test"),
                        },
                        default=str,
                    )
                )
            return
        if not recs:
            click.echo("no registered models; `sortline train` or `sortline adapt` registers one")
            return
        click.echo(f"  {'model':<40} {'arch':<20} {'val F1':>7} {'test acc':>8}  created")
        for r in recs:
            mark = "*" if r.active else " "
            click.echo(
                f"{mark} {r.name + ':' + r.version:<40} {r.arch:<20} "
                f"{_score(r.metrics, 'val', 'macro_f1'):>7} "
                f"{_score(r.metrics, 'test', 'accuracy'):>8}  {r.created_at:%Y-%m-%d %H:%M}"
            )


@models.command("activate")
@click.argument("ref", metavar="NAME:VERSION")
@click.option(
    "--force",
    is_flag=True,
    help="Activate even below the active model's val macro-F1 or SORTLINE_PROMOTION_FLOOR.",
)
def activate_command(ref: str, force: bool) -> None:
    """Make NAME:VERSION the model workers load (an older version: a rollback)."""
    click.echo(activate(ref, force=force))
