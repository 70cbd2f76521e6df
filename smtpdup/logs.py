"""Logging setup for smtpdup: one event per line on stderr, JSON or text.

This module owns the handler and formatter of the ``smtpdup`` logger and the
stable names of log fields. Library code never configures logging; it does

    log = logs.get("relay")          # logging.getLogger("smtpdup.relay")
    log.info("transaction", extra={"queue_id": qid, "reply": str(reply)})

The message is the *event*: a stable snake_case name, never a sentence and
never formatted with data (``%s`` arguments are allowed but discouraged);
data goes in ``extra=`` fields. Nothing here inspects what is logged, so it is
the caller's duty never to pass a message body, a header block or a password
(log a destination with its password masked).

JSON (``fmt="json"``), one object per line::

    {"time": "2025-01-01T12:00:00.123Z", "level": "info",
     "logger": "smtpdup.relay", "event": "transaction", "queue_id": "..."}

Text (``fmt="text"``), one line, logfmt-style values::

    2025-01-01T12:00:00.123Z info transaction queue_id=abc code=250

A traceback (``log.exception``) goes in the ``exc_info`` field in JSON and on
the following lines in text. gevent's own error printing (a threadpool task
or a greenlet that raised) is routed here too (``blocking.log_hub_errors``).

Field names are spelled alike everywhere: ``queue_id``, ``client`` (the
inbound peer's IP address, no port), ``sender``, ``destination`` (display
form, password masked), ``reply`` (an SMTP reply as text, never content),
``outcome``, ``error``, and units in names (``duration_ms``).
``TRANSACTION_FIELDS`` and ``BACKUP_ATTEMPT_FIELDS`` name what the two lines
an operator queries most carry; the README lists the same, and a test holds
the code to both.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from typing import IO, Any

from pythonjsonlogger.core import RESERVED_ATTRS
from pythonjsonlogger.json import JsonFormatter

ROOT = "smtpdup"

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("json", "text")

# Fields every line carries, in this order.
TIME = "time"
LEVEL = "level"
LOGGER = "logger"
EVENT = "event"
EXC_INFO = "exc_info"  # the traceback, when there is one (python-json-logger names it)

# The "transaction" line (relay.py), one per message: the client's IP, the
# envelope sender, how many recipients the primary accepted, the content's
# size in bytes as the client sent it (dot-stuffed), the primary's final reply, the outcome as in
# smtpdup_transactions_total, the time from MAIL to the reply.
TRANSACTION_FIELDS = ("queue_id", "client", "sender", "recipients", "size", "reply", "outcome", "duration_ms")
# The "backup_attempt" line (delivery.py), one per attempt at one backup:
# how many of the copy's recipients were delivered, deferred, dead.
BACKUP_ATTEMPT_FIELDS = ("queue_id", "destination", "attempt", "reply", "outcome",
                         "delivered", "deferred", "dead", "duration_ms")

# LogRecord attributes that are not extra= fields ("taskName" is new in 3.12).
_RECORD_ATTRS = frozenset(RESERVED_ATTRS) | {"taskName"}


def get(name: str) -> logging.Logger:
    """Return the logger ``smtpdup.<name>`` (``name`` without the prefix)."""
    return logging.getLogger(f"{ROOT}.{name}")


def setup(level: str = "info", fmt: str = "json", stream: IO[str] | None = None) -> None:
    """Send the ``smtpdup`` logger's records to ``stream`` (default: stderr).

    ``level`` is one of ``LEVELS``, ``fmt`` one of ``FORMATS``; anything else
    raises ``ValueError``. Calling it again replaces the handler (SIGHUP reload
    may change level or format). Records still propagate to the root logger,
    which has no handler in the relay but lets pytest's ``caplog`` see them.
    """
    if level not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.setFormatter(_JsonLineFormatter() if fmt == "json" else _TextLineFormatter())
    logger = logging.getLogger(ROOT)
    for old in list(logger.handlers):
        logger.removeHandler(old)
        old.close()
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def _time(record: logging.LogRecord) -> str:
    # ISO 8601 in UTC with milliseconds and a "Z", as log shippers expect.
    stamp = datetime.fromtimestamp(record.created, tz=timezone.utc)
    return stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS and not k.startswith("_")}


class _JsonLineFormatter(JsonFormatter):
    """python-json-logger's formatter with our four leading fields."""

    def __init__(self) -> None:
        # fmt=[]: no "%(message)s"-style fields; add_fields puts ours first.
        super().__init__(fmt=[], reserved_attrs=sorted(_RECORD_ATTRS), json_ensure_ascii=False)

    def add_fields(self, log_data: dict[str, Any], record: logging.LogRecord, message_dict: dict[str, Any]) -> None:
        core = {
            TIME: _time(record),
            LEVEL: record.levelname.lower(),
            LOGGER: record.name,
            EVENT: record.getMessage(),
        }
        log_data.update(core)
        super().add_fields(log_data, record, message_dict)  # extras, exc_info
        # An extra= field cannot shadow the leading ones (dict order is kept).
        log_data.update(core)


class _TextLineFormatter(logging.Formatter):
    """``time level event key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_time(record), record.levelname.lower(), record.getMessage()]
        parts += [f"{key}={_text_value(value)}" for key, value in _extras(record).items()]
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value) if isinstance(value, bytes) else str(value)
    # Quote what would make the line ambiguous to split on spaces or "=".
    if text == "" or any(c in text for c in ' ="\\') or not text.isprintable():
        escaped = text.replace("\\", "\\\\").replace('"', '\\"')
        # Control characters as Python escapes ("\n", "\x00"): one line stays one line.
        escaped = "".join(c if c.isprintable() else repr(c)[1:-1] for c in escaped)
        return f'"{escaped}"'
    return text
