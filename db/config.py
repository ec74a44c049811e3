"""Settings shared by every sortline package, and the database's own."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url


def mask_url(url: str) -> str:
    """Return *url* with any password replaced by ``***``."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a SQLAlchemy URL (e.g. redis+socket://)
        if "@" in url and "://" in url:
            scheme, rest = url.split("://", 1)
            creds, host = rest.rsplit("@", 1)
            user = creds.split(":", 1)[0]
            return f"{scheme}://{user}:***@{host}"
        return url


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


def get_db_settings() -> DbSettings:
    """Read the database settings from the environment now."""
    return DbSettings()
