"""Parsing command lines with click's own parser, without running them."""

from __future__ import annotations

import click


def parse_cli(group: click.Group, prog: str, args: list[str], obj=None) -> list[click.Context]:
    """Resolve *args* down to the leaf command with click's own parser; raise on any error.

    Every option is parsed and converted (types, ranges, choices, callbacks) by
    ``make_context``, exactly as a run would, but nothing is invoked. Extra arguments are
    allowed only where the leaf command takes them (``sortline worker`` hands them to Celery).
    """
    ctxs = [group.make_context(prog, list(args), obj=obj)]
    cmd: click.Command = group
    while isinstance(cmd, click.Group):
        ctx = ctxs[-1]
        rest = [*getattr(ctx, "_protected_args", ctx.protected_args), *ctx.args]
        if not rest:
            if cmd.invoke_without_command:  # e.g. `sortline tune --study ...`
                break
            raise click.UsageError(f"`{prog}` needs a command", ctx)
        name, cmd, rest = cmd.resolve_command(ctx, rest)
        ctxs.append(cmd.make_context(name, rest, parent=ctx))
    leaf = ctxs[-1]
    assert not leaf.args or leaf.allow_extra_args, f"unexpected arguments {leaf.args}"
    return ctxs
