"""Keeps secrets out of the server's logs: invitation links and secret query parameters.

uvicorn's access log writes every request line (``GET /invite/<secret> HTTP/1.1``); anyone who can
read the log could use an open invitation. ``RedactSecrets`` is a logging filter that rewrites the
record's message and arguments before any handler formats them: the path segment after
``/invite/`` becomes ``[redacted]``, and so do the values of query parameters that may carry a
secret (token, invite, secret, password, csrf_token, access_token).

``install_log_redaction()`` puts the filter on uvicorn's loggers and the app's own; it is
idempotent and is called whenever the app is built. Filters on a logger survive uvicorn's
``dictConfig`` (which replaces handlers, not filters).
"""

from __future__ import annotations

import logging
import re
from typing import Any, Iterable

REDACTED = "[redacted]"
LOGGERS = ("uvicorn.access", "uvicorn.error", "uvicorn", "megacoach.app")

_INVITE = re.compile(r"(/invite/)[^?#\s\"']+")
_QUERY = re.compile(r"([?&;](?:token|invite|secret|password|csrf_token|access_token)=)[^&#;\s\"']*", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with invitation secrets and secret query values replaced by ``[redacted]``."""
    if "/invite/" in text:
        text = _INVITE.sub(r"\1" + REDACTED, text)
    if "=" in text:
        text = _QUERY.sub(r"\1" + REDACTED, text)
    return text


def _clean(value: Any) -> Any:
    return redact(value) if isinstance(value, str) else value


class RedactSecrets(logging.Filter):
    """A logging filter that never drops a record, only redacts secrets in it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_clean(a) for a in record.args)
        elif isinstance(record.args, dict):
            record.args = {k: _clean(v) for k, v in record.args.items()}
        return True


def install_log_redaction(names: Iterable[str] = LOGGERS) -> None:
    """Add ``RedactSecrets`` to these loggers (once each)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactSecrets) for f in logger.filters):
            logger.addFilter(RedactSecrets())
