"""SMTP replies as values, and the canned replies smtpdup answers with.

This module owns the `Reply` value type (code, enhanced status code, text),
its framing on the wire (`Reply.to_bytes`), its parsing from what smtplib
returns (`Reply.from_smtplib`), and the replies smtpdup produces itself, as
module constants named for their meaning (after slimta's ``smtp/reply.py``).

It imports only the standard library and does no I/O. A destination's reply
passes through it unchanged in code and text: `from_smtplib` splits off the
enhanced status code so that `to_bytes` can put it back on every line.

`take_reply` reads a destination's replies off a receive buffer (sans-IO:
the caller does the reads), as smtplib's ``getreply`` would, for less.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# RFC 3463: class.subject.detail, class 2, 4 or 5, subject and detail up to
# three digits. Followed by a space or by the end of the line.
_ENHANCED_CODE = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: +|$)")


# Bounds on what a destination can make us buffer for one reply: a line as
# smtplib's _MAXLINE, a whole (multi-line) reply.
MAX_REPLY_LINE_BYTES = 8192
MAX_REPLY_BYTES = 65536


class ReplyError(ValueError):
    """What the destination sent is not an SMTP reply (no 3-digit code, a
    line or a reply beyond the bounds): the session cannot go on."""


def _lines(text: str) -> list[str]:
    """Split reply text into lines on CRLF, CR or LF (and nothing else).

    `str.splitlines` would also split on form feeds, U+2028 and the like,
    which are not line ends on the wire.
    """
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: ``Reply(451, "4.4.1", "primary unavailable")``.

    `enhanced` is an RFC 3463 status code or "" (the greeting, EHLO and 354
    carry none, nor do replies from destinations without
    ENHANCEDSTATUSCODES). `text` may hold "\\n" for a multi-line reply; the
    enhanced code, when present, prefixes every line.
    """

    code: int
    enhanced: str = ""
    text: str = ""

    def to_bytes(self) -> bytes:
        """The reply as sent: ``b"451 4.4.1 text\\r\\n"``, multi-line
        ``b"250-a\\r\\n250 b\\r\\n"``. Every line ends with CRLF; a CR or LF
        inside `text` only ever separates lines, so no bare CR/LF goes out.
        Text that is not encodable (lone surrogates) is replaced by "?"."""
        prefix = f"{self.code:03d}"
        text = self.text
        if "\n" not in text and "\r" not in text:  # the common case, made cheap
            body = f"{self.enhanced} {text}" if self.enhanced and text else self.enhanced or text
            return (f"{prefix} {body}\r\n" if body else f"{prefix}\r\n").encode("utf-8", "replace")
        lines = _lines(text.rstrip("\r\n"))  # no empty last line
        last = len(lines) - 1
        out = []
        for n, line in enumerate(lines):
            body = " ".join(w for w in (self.enhanced, line) if w)
            if n != last:
                out.append(f"{prefix}-{body}\r\n")
            else:
                out.append(f"{prefix} {body}\r\n" if body else f"{prefix}\r\n")
        return "".join(out).encode("utf-8", "replace")

    @property
    def is_completed(self) -> bool:
        """2xx: the command was carried out."""
        return 200 <= self.code < 300

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx: completed, or intermediate (354 to DATA)."""
        return 200 <= self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: try again later."""
        return 400 <= self.code < 500

    @property
    def is_permanent(self) -> bool:
        """5xx: do not try again as is."""
        return 500 <= self.code < 600

    @classmethod
    def from_smtplib(cls, code: int, message: bytes | str) -> Reply:
        """Build a reply from smtplib's ``(code, message)``.

        smtplib joins the lines of a multi-line reply with b"\\n" and strips
        the code from each. A leading enhanced status code ("2.1.0 Ok") is
        split off the first line, and off every later line that repeats it.
        Bytes that are not UTF-8 are replaced (U+FFFD), never an error.
        """
        if isinstance(message, bytes):
            message = message.decode("utf-8", "replace")
        lines = _lines(message)
        match = _ENHANCED_CODE.match(lines[0])
        if match is None:
            return cls(code, "", "\n".join(lines))
        enhanced = match.group(1)
        stripped = []
        for line in lines:
            m = _ENHANCED_CODE.match(line)
            stripped.append(line[m.end():] if m is not None and m.group(1) == enhanced else line)
        return cls(code, enhanced, "\n".join(stripped))

    @classmethod
    def _from_line(cls, code: int, text: bytes) -> Reply:
        """A one-line reply's text (code and separator off, stripped)."""
        message = text.decode("utf-8", "replace")
        if "\r" in message:
            return cls.from_smtplib(code, message)
        # "2.1.0 Ok": a digit, a dot, then the rest of RFC 3463's shape.
        if len(message) >= 5 and message[1] == "." and message[0] in "245":
            match = _ENHANCED_CODE.match(message)
            if match is not None:
                return cls(code, match.group(1), message[match.end():])
        return cls(code, "", message)

    def __str__(self) -> str:
        """One line for logs: ``451 4.4.1 text``, line breaks shown as " / "."""
        text = " / ".join(_lines(self.text))
        return " ".join(w for w in (str(self.code), self.enhanced, text) if w)


def take_reply(buffer: bytearray) -> Reply | None:
    """Take one complete reply off the front of ``buffer``; None (and the
    buffer untouched) while it is incomplete. Raises ReplyError.

    As smtplib's ``getreply``: lines end with LF (a CR before it and
    spaces or tabs around the text are stripped), a line whose fourth byte
    is "-" is followed by more, the code is the last line's, and the text
    is the lines' text joined by "\\n".
    """
    end = buffer.find(b"\n")
    if end < 0:
        if len(buffer) > MAX_REPLY_LINE_BYTES:
            raise ReplyError("reply line too long")
        return None
    if buffer[3:4] != b"-":  # one line: the common case
        if end > MAX_REPLY_LINE_BYTES:
            raise ReplyError("reply line too long")
        code = _code(buffer, 0)
        text = bytes(buffer[4:end]).strip(b" \t\r\n")
        del buffer[: end + 1]
        return Reply._from_line(code, text)
    texts = []
    start = 0
    while True:
        if end - start > MAX_REPLY_LINE_BYTES or end > MAX_REPLY_BYTES:
            raise ReplyError("reply too long")
        texts.append(bytes(buffer[start + 4 : end]).strip(b" \t\r\n"))
        last = buffer[start + 3 : start + 4] != b"-"
        code_at, start = start, end + 1
        if last:
            break
        end = buffer.find(b"\n", start)
        if end < 0:
            if len(buffer) - start > MAX_REPLY_LINE_BYTES or len(buffer) > MAX_REPLY_BYTES:
                raise ReplyError("reply too long")
            return None
    code = _code(buffer, code_at)
    del buffer[:start]
    return Reply.from_smtplib(code, b"\n".join(texts))


def _code(buffer: bytearray, at: int) -> int:
    digits = buffer[at : at + 3]
    if len(digits) != 3 or not digits.isdigit() or not b"200" <= digits < b"600":
        raise ReplyError(f"not an SMTP reply: {bytes(buffer[at : at + 40])!r}")
    return int(digits)


# --- Canned replies ---------------------------------------------------------
# Positive.
OK = Reply(250, "2.0.0", "OK")
CLOSING = Reply(221, "2.0.0", "Bye")
READY_TLS = Reply(220, "2.0.0", "Ready to start TLS")
VRFY_CANNOT = Reply(252, "2.5.0", "Cannot VRFY user, but will accept message and attempt delivery")
HELP = Reply(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT VRFY HELP STARTTLS")
# No enhanced code on 354: RFC 2034 uses them on 2xx, 4xx and 5xx replies.
START_DATA = Reply(354, "", "End data with <CR><LF>.<CR><LF>")

# Command errors, answered by the protocol itself.
UNKNOWN_COMMAND = Reply(500, "5.5.2", "Command unrecognized")
LINE_TOO_LONG = Reply(500, "5.5.2", "Line too long")
SYNTAX_ERROR = Reply(501, "5.5.4", "Syntax error in parameters or arguments")
HELO_SYNTAX = Reply(501, "5.5.4", "Syntax: EHLO hostname")
MAIL_SYNTAX = Reply(501, "5.5.4", "Syntax: MAIL FROM:<address> [parameters]")
RCPT_SYNTAX = Reply(501, "5.5.4", "Syntax: RCPT TO:<address>")
BAD_ADDRESS = Reply(501, "5.1.7", "Bad address syntax")
UNKNOWN_PARAMETER = Reply(555, "5.5.4", "Unsupported parameter")
BAD_SEQUENCE = Reply(503, "5.5.1", "Bad sequence of commands")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first")
TLS_UNAVAILABLE = Reply(454, "4.7.0", "TLS not available")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS already active")

# Limits.
MESSAGE_TOO_BIG = Reply(552, "5.3.4", "Message too big")
TOO_MANY_RECIPIENTS = Reply(452, "4.5.3", "Too many recipients")
BARE_NEWLINE = Reply(550, "5.5.2", "Bare CR or LF in message content")
NUL_IN_CONTENT = Reply(550, "5.6.0", "NUL byte in message content")

# Relay and server conditions.
PRIMARY_UNAVAILABLE = Reply(451, "4.4.1", "Primary server unavailable, try again later")
LOCAL_ERROR = Reply(451, "4.3.0", "Local error in processing, try again later")
SMTPUTF8_UNSUPPORTED = Reply(553, "5.6.7", "SMTPUTF8 not supported by the destination")
IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, closing connection")
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections, try again later")
ACCESS_DENIED = Reply(554, "5.7.1", "Access denied")
