"""The error family: every error a user can cause is a :class:`SortlineError`.

Library code in every layer raises these (this module imports nothing of the project, so
``db`` may use it too); the ``sortline`` command root turns them into one line on stderr and
the class's exit code, never a traceback.
"""

from __future__ import annotations


class SortlineError(Exception):
    """An error a user can fix; its message names the thing and says what to do."""

    exit_code = 1


class NotFound(SortlineError, LookupError):
    """A job, model or study that does not exist."""


class Unavailable(SortlineError, ConnectionError):
    """A service (broker, database) that does not answer."""


class ConfigError(SortlineError, ValueError):
    """An option or setting with a value that cannot be used."""


class PromotionRefused(SortlineError):
    """A model that may not become the active one without ``--force``."""
