"""Untrusted text on its way out (terminals, logs, CSV, HTML), and ids checked at the edge.

File names, job sources and error messages are user data. Before they reach a terminal or a
log line their control characters are shown escaped (``\\x1b``, ``\\n``), so no ANSI or OSC
sequence runs and no line is forged; a CSV cell that a spreadsheet would run as a formula is
quoted. The bottom of the import graph: standard library only.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import TypeGuard

# C0 and C1 controls, DEL, and the Unicode marks that reorder or hide text (bidi overrides and
# isolates, zero-width characters, line and paragraph separators, the byte order mark)
_CONTROL = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
_CONTROL_KEEP_NEWLINES = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]"
)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r", "\n", "\uff1d", "\uff0b", "\uff0d", "\uff20")
_JOB_ID = re.compile(r"[0-9a-f]{1,32}")
JOB_ID_LENGTH = 32


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def clean_text(value: object, *, keep_newlines: bool = False) -> str:
    """*value* as text with every control character shown escaped (``\\x1b``, ``\\u202e``)."""
    text = value if isinstance(value, str) else str(value)
    pattern = _CONTROL_KEEP_NEWLINES if keep_newlines else _CONTROL
    return pattern.sub(_escape, text)


def csv_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: control characters escaped, formulas quoted."""
    if not isinstance(value, str):
        return value
    text = clean_text(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def is_job_id(value: object, *, prefix: bool = False) -> TypeGuard[str]:
    """Whether *value* is a job id (32 lower-case hex digits), or with *prefix* the start of one."""
    if not isinstance(value, str) or not _JOB_ID.fullmatch(value):
        return False
    return prefix or len(value) == JOB_ID_LENGTH


class EscapeControlCharacters(logging.Filter):
    """A log handler filter: every argument of a record shown with its controls escaped.

    The message's own text is the code's, so it keeps its line breaks; what is put into it
    (a job id, a file name, an exception's text) cannot start a line or send escapes.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, Mapping):
            record.args = {k: _clean_arg(v) for k, v in args.items()}
        elif args:
            record.args = tuple(_clean_arg(a) for a in args)
        elif isinstance(record.msg, str):
            record.msg = clean_text(record.msg, keep_newlines=True)
        return True


def _clean_arg(value: object) -> object:
    """A log argument with its control characters escaped (numbers stay numbers for %d)."""
    if isinstance(value, int | float) or value is None:
        return value
    return clean_text(value)


def escape_log_controls(logger: logging.Logger | None = None) -> None:
    """Put :class:`EscapeControlCharacters` on every handler of *logger* (default: root)."""
    logger = logger or logging.getLogger()
    for handler in logger.handlers:
        if not any(isinstance(f, EscapeControlCharacters) for f in handler.filters):
            handler.addFilter(EscapeControlCharacters())
