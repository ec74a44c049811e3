"""Settings shared by every sortline package, and the database's own."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from typing import TypeVar

from pydantic_settings import BaseSettings, SettingsConfigDict

_SECRET_PARAM = re.compile(r"([?&](?:password|passwd|pwd|secret|token)=)[^&#]*", re.IGNORECASE)


def mask_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``.

    Works for any scheme, for a password holding ``@`` or ``:`` that was not
    percent-encoded (everything up to the last ``@`` of the authority is credentials), and
    for a password given as a query parameter (``?password=...``).
    """
    if "://" not in url:
        return url
    url = _SECRET_PARAM.sub(r"\1***", url)
    scheme, rest = url.split("://", 1)
    end = len(rest)
    for c in "?#":
        if c in rest:
            end = min(end, rest.index(c))
    at = rest.rfind("@", 0, end)
    if at < 0:
        return url
    creds = rest[:at]
    if ":" not in creds:  # a user name alone
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{rest[at + 1 :]}"


S = TypeVar("S", bound="SortlineSettings")
_GETTERS: list = []


def _environment() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("SORTLINE_")))


def settings_getter(fn: Callable[[], S]) -> Callable[[], S]:
    """The one caching rule of settings: read once per process and ``SORTLINE_*`` environment.

    The object is read again only when a ``SORTLINE_*`` variable changes (a test, a command
    that sets one for its child), never per call; :func:`clear_settings` forgets them all
    (after ``.env`` changed).
    """
    cache: dict[tuple, S] = {}

    def get() -> S:
        key = _environment()
        found = cache.get(key)
        if found is None:
            if len(cache) >= 8:
                cache.clear()
            found = cache[key] = fn()
        return found

    get.cache_clear = cache.clear  # type: ignore[attr-defined]
    get.__doc__, get.__name__ = fn.__doc__, fn.__name__
    _GETTERS.append(get)
    return get


def clear_settings() -> None:
    """Forget every cached settings object."""
    for getter in _GETTERS:
        getter.cache_clear()


class SortlineSettings(BaseSettings):
    """Base for every package's settings: ``SORTLINE_*`` variables, then ``.env``."""

    model_config = SettingsConfigDict(
        env_prefix="SORTLINE_", env_file=".env", extra="ignore", frozen=True
    )

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            if isinstance(value, str) and name is not None and name.endswith("_url"):
                value = mask_url(value)
            yield name, value

    def __str__(self) -> str:  # pydantic's __str__ bypasses __repr__
        return repr(self)


class DbSettings(SortlineSettings):
    """Where results, jobs and the model registry live."""

    database_url: str = "sqlite:///sortline.db"
    auto_migrate: bool = True
    promotion_floor: float = 0.5  # a model below this val macro-F1 is activated only if forced
    db_timeout: float = 30.0  # PostgreSQL: connect, statement, lock; silence on the wire
    reconcile_after: float = 300.0  # a job without a new row for this long is reconciled
    reconcile_max_resends: int = 3  # then its missing positions become error rows


@settings_getter
def get_db_settings() -> DbSettings:
    """The database settings."""
    return DbSettings()
