"""What the service's processes log: client mistakes as one line without values, and no
client-controlled character that could forge or break a line.

A request's path, headers and file name are the client's; BentoML's access log prints the
path percent-decoded, so `GET /nope%0a2026-01-01T00:00:00+0000 [ERROR] ...` used to write a
second, forged line (and `%00` a NUL byte). `install()` escapes every control character
of every record's message in this process, whoever logs it.
"""

from __future__ import annotations

import logging
import re

from pydantic import ValidationError

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators.
CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    r"""The text with each control character as a visible escape: one line, no NUL.

    >>> escape_controls("GET /nope\n2026-01-01 [ERROR] x\x00")
    'GET /nope\\x0a2026-01-01 [ERROR] x\\x00'
    """
    return CONTROLS.sub(_escape, text)


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def install() -> None:
    """Every log record made in this process from now on has its message escaped (a
    record factory, so it holds whichever logger or handler BentoML sets up later)."""
    make = logging.getLogRecordFactory()
    if getattr(make, "escapes_controls", False):
        return

    def escaped(*args, **kwargs) -> logging.LogRecord:
        record = make(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: logging reports it as it always did
            return record
        if CONTROLS.search(message):
            record.msg, record.args = escape_controls(message), ()
        return record

    escaped.escapes_controls = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(escaped)


class ClientErrorsWithoutValues(logging.Filter):
    """BentoML logs every request it refuses with a traceback at ERROR, and pydantic's
    message quotes the input (`input_value=` holds a whole transaction). A client's
    mistake is one INFO line here, with no values: the README promises none in logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        status = getattr(getattr(error, "error_code", None), "value", 500)
        if isinstance(error, ValidationError) or (error is not None and status < 500):
            kind = type(error).__name__
            record.msg, record.args = "request refused by the framework: %s", (kind,)
            record.exc_info, record.exc_text = None, None
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True
