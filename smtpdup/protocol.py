"""Sans-IO SMTP server protocol: bytes in -> events out, replies -> bytes.

This module owns the server side of an SMTP session as a state machine, in
the manner of h11's ``Connection``: command parsing, the sequence rules, the
EHLO capabilities, the replies to syntax, sequence and limit errors, the
reading of message content up to the final dot (with dot-stuffing, bare CR/LF
and NUL handling and the size limit), and the bounds of every input buffer.

It must not do I/O: no sockets, clocks, logging or gevent; it imports only
`smtpdup.reply` and the standard library. The gevent shell (`session.py`)
moves bytes between a socket and this object and asks a backend for the
replies that only the primary can give (MAIL, RCPT, DATA, final dot).

Usage::

    proto = ServerProtocol(limits, domain="relay.example")
    sock.sendall(proto.greeting())
    while not proto.closed:
        for event in proto.events():
            if isinstance(event, MailFrom):
                proto.reply(backend.mail(event))       # the primary's verdict
            ...                                        # RcptTo, DataStart, DataEnd
        out = proto.data_to_send()                     # every reply, in order
        if out:
            sock.sendall(out)                          # one write per batch
        if started_tls: wrap the socket, then proto.tls_started()
        proto.receive_data(sock.recv(65536))           # b"" = peer closed

Replies: ONE outbound buffer. Every reply (the protocol's own and the ones
given to `reply()`) is appended to it in the client's command order, and
`data_to_send()` drains it. `reply()` returns None: the bytes it is given
leave only through ``data_to_send()``, which the shell calls once the events
of a batch are exhausted, so a whole pipelined batch is one write.

State: `state` says where the session stands (`State`, with the table of
moves); `_ALLOWED` below is the one table of which verbs each state accepts.

Command lines are decoded as UTF-8 with ``surrogateescape``. Addresses and
EHLO names that are not valid UTF-8 (or hold control characters) get 501,
so every `str` in an event is clean Unicode, safe to encode as UTF-8.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import ClassVar

from smtpdup import reply as replies
from smtpdup.reply import Reply

# RFC 5321 4.5.3.1.4: a command line is at most 512 octets, CRLF included.
MAX_COMMAND_LINE_BYTES = 512

# End of data. The CRLF ending the DATA command line counts as its first CRLF,
# so an empty message is b".\r\n" right after the 354.
_TERMINATOR = b"\r\n.\r\n"

# Content held back between receive_data() calls: only a suffix that may be
# the beginning of the terminator (b"\r\n.\r" at most), so that a terminator
# or CRLF split across reads is still found. Everything else leaves at once,
# whatever the line length: no buffer grows with a line or a message.
DATA_HOLD_BYTES = len(_TERMINATOR) - 1

# RFC 1870 SIZE values beyond this many digits are not numbers we compare.
_MAX_SIZE_DIGITS = 20

BARE_NEWLINE_MODES = ("normalize", "reject")


@dataclass(frozen=True, slots=True)
class Limits:
    """The `smtp.*` settings the protocol enforces."""

    max_message_bytes: int = 26214400
    max_recipients: int = 1000
    bare_newline: str = "normalize"  # or "reject"
    require_tls: bool = False
    tls_available: bool = False  # STARTTLS advertised and accepted
    max_line_bytes: int = MAX_COMMAND_LINE_BYTES  # command line incl. CRLF

    def __post_init__(self) -> None:
        if self.bare_newline not in BARE_NEWLINE_MODES:
            raise ValueError(f"bare_newline must be one of {BARE_NEWLINE_MODES}, got {self.bare_newline!r}")
        if self.max_line_bytes < 8 or self.max_message_bytes < 0 or self.max_recipients < 1:
            raise ValueError(f"limits out of range: {self!r}")


class ProtocolError(Exception):
    """The caller used the protocol wrongly (our bug, never the client's):
    `reply()` with nothing awaiting a reply, `tls_started()` without STARTTLS.
    `reply` is what the client should be told (451 4.3.0)."""

    def __init__(self, message: str, reply: Reply = replies.LOCAL_ERROR) -> None:
        super().__init__(message)
        self.reply = reply


# --- Events -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """EHLO (`extended`) or HELO; already answered 250 by the protocol."""

    name: str
    extended: bool


@dataclass(frozen=True, slots=True)
class MailFrom:
    """MAIL FROM, syntax and limits checked; needs `reply()`.

    `sender` is "" for the null path <>. `params` has upper-case keys, e.g.
    ``{"SIZE": "1234", "BODY": "8BITMIME", "SMTPUTF8": None}``; only SIZE
    (digits, within max_message_bytes), BODY (upper-cased 7BIT or 8BITMIME)
    and SMTPUTF8 (no value) get this far. A 2xx reply opens the transaction.
    """

    sender: str
    params: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class RcptTo:
    """RCPT TO; needs `reply()`. A 2xx reply counts as an accepted recipient.
    No RCPT parameter is supported, so `params` is always empty."""

    recipient: str
    params: dict[str, str | None]


@dataclass(frozen=True, slots=True)
class DataStart:
    """DATA with at least one accepted recipient; needs `reply()`. A 354
    reply starts the content; any other reply ends the transaction."""


@dataclass(frozen=True, slots=True)
class DataChunk:
    """A piece of message content, as WIRE bytes: CRLF line ends, dot-stuffed,
    no NUL, safe to send after a 354 as is. Never empty. Never holds the terminator; a chunk may
    end mid-line. Joined, the chunks of a message are empty or end with CRLF,
    so the sender appends b".\\r\\n" and nothing else."""

    data: bytes


@dataclass(frozen=True, slots=True)
class DataEnd:
    """The client's CRLF.CRLF arrived and the content was acceptable; needs
    `reply()` (the final reply). The terminator is in no DataChunk."""


@dataclass(frozen=True, slots=True)
class DataAbort:
    """Content refused while streaming (too big, or bare CR/LF or NUL in
    reject mode): the backend drops the transaction (nothing may be delivered). The
    protocol reads on to the client's terminator, holding nothing, and then
    answers `reply` itself. No DataEnd follows."""

    reply: Reply


@dataclass(frozen=True, slots=True)
class Reset:
    """RSET (already answered 250), or EHLO/HELO in a transaction: the
    backend clears the envelope."""


@dataclass(frozen=True, slots=True)
class StartTls:
    """STARTTLS, answered 220. Input pipelined after it is discarded. The
    shell sends `data_to_send()`, wraps the socket, then calls
    `tls_started()`; until then `events()` yields nothing."""


@dataclass(frozen=True, slots=True)
class Quit:
    """QUIT, answered 221; `closed` turns True once that reply is drained."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed (``receive_data(b"")``), possibly mid-DATA: drop any
    transaction. Always the last event."""


Event = Hello | MailFrom | RcptTo | DataStart | DataChunk | DataEnd | DataAbort | Reset | StartTls | Quit | ConnectionClosed


# --- States and the sequence table ------------------------------------------


class State(enum.Enum):
    """Where a session stands in the command sequence: `ServerProtocol.state`.

    The moves, all made inside the protocol::

        START        EHLO/HELO accepted                    -> GREETED
        GREETED      MAIL answered 2xx                     -> TRANSACTION
        GREETED      STARTTLS answered 220, tls_started()  -> START
        TRANSACTION  DATA answered 354                     -> DATA
        TRANSACTION  DATA answered otherwise               -> GREETED
        TRANSACTION  RSET, EHLO/HELO accepted (Reset)      -> GREETED
        DATA         final dot answered (DataEnd)          -> GREETED
        DATA         client's dot after a DataAbort        -> GREETED
        any          QUIT, or the peer closed              -> CLOSED

    Every other command leaves the state as it is (an accepted RCPT only
    counts a recipient). An event that needs `reply()` moves nothing by
    itself: the move is made when the reply is given.
    """

    START = "start"  # connected (or TLS just started): no EHLO/HELO yet
    GREETED = "greeted"  # EHLO/HELO done, no transaction
    TRANSACTION = "transaction"  # MAIL accepted, content not started
    DATA = "data"  # 354 given: reading content up to the final dot and its reply
    CLOSED = "closed"  # QUIT answered or peer gone: input ignored


_ANYTIME = frozenset({b"EHLO", b"HELO", b"RSET", b"NOOP", b"QUIT", b"VRFY", b"HELP"})

# The sequence rules: which verbs each state accepts. A known verb outside
# its state is answered 503 5.5.1 (BAD_SEQUENCE) and changes nothing; an
# unknown verb gets 500 5.5.2. DATA and CLOSED read no command lines. The
# rules that need more than the state are in the handlers of their verbs:
# MAIL while TLS is required and not active (530 5.7.0, before its argument
# is parsed); DATA with no accepted recipient (554 5.5.1) and STARTTLS with
# TLS already active (503 5.5.1), both after their argument is checked.
_ALLOWED: dict[State, frozenset[bytes]] = {
    State.START: _ANYTIME,
    State.GREETED: _ANYTIME | {b"MAIL", b"STARTTLS"},
    State.TRANSACTION: _ANYTIME | {b"RCPT", b"DATA"},
    State.DATA: frozenset(),
    State.CLOSED: frozenset(),
}

# A path: <...> holding unquoted characters or quoted strings (a quoted local
# part may hold spaces and '>'). The alternatives begin with distinct
# characters, so matching is linear.
_PATH = r'<((?:[^<>"\\ ]|"(?:[^"\\]|\\.)*")*)>'
_MAIL_FROM = re.compile(r"FROM: *" + _PATH + r"(?: +(.*))?\Z", re.IGNORECASE)
_RCPT_TO = re.compile(r"TO: *" + _PATH + r"(?: +(.*))?\Z", re.IGNORECASE)
# RFC 5321 esmtp-keyword; a value is anything up to the next space.
_PARAM_KEYWORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]*\Z")
# Control characters, and the lone surrogates that surrogateescape decoding
# makes of bytes that are not UTF-8.
_UNCLEAN = re.compile("[\x00-\x1f\x7f\ud800-\udfff]")

_BODY_TYPES = frozenset({"7BIT", "8BITMIME"})


def _held_back(buf: bytearray) -> int:
    """Length of the longest suffix of `buf` that may begin the terminator."""
    if not buf or buf[-1] not in b"\r\n.":
        return 0
    if buf.endswith(b"\r\n.\r"):
        return 4
    if buf.endswith(b"\r\n."):
        return 3
    if buf.endswith(b"\r\n"):
        return 2
    return 1 if buf.endswith(b"\r") else 0


def _parse_params(text: str) -> dict[str, str | None] | None:
    """``"SIZE=10 SMTPUTF8"`` -> ``{"SIZE": "10", "SMTPUTF8": None}``; None
    on bad syntax (bad keyword, empty value, a keyword twice)."""
    params: dict[str, str | None] = {}
    for token in text.split(" "):
        if not token:
            continue
        keyword, sep, value = token.partition("=")
        if not _PARAM_KEYWORD.match(keyword) or (sep and not value) or _UNCLEAN.search(value):
            return None
        keyword = keyword.upper()
        if keyword in params:
            return None
        params[keyword] = value if sep else None
    return params


def _strip_source_route(address: str) -> str:
    """RFC 5321 4.1.1.3: ``<@a,@b:user@c>`` is ``<user@c>``."""
    if address.startswith("@") and ":" in address:
        return address.split(":", 1)[1]
    return address


class ServerProtocol:
    """One inbound SMTP session, without I/O. See the module docstring."""

    # One per connection, idle ones included: no per-instance __dict__.
    __slots__ = (
        "limits", "domain", "_state", "_buffer", "_outbound", "_ready", "_awaiting",
        "_tls_active", "_tls_pending", "_eof", "_discarding", "_recipients",
        "_line_start", "_segment_start", "_dot_line", "_message_bytes", "_abort",
    )

    def __init__(self, limits: Limits, domain: str) -> None:
        self.limits = limits
        self.domain = domain
        self._state = State.START
        self._buffer = bytearray()  # input not yet parsed; bounds: see _advance_*
        self._outbound = bytearray()  # replies not yet drained, in command order
        # Parsed events not yet yielded: a handful at most, so a list (an idle
        # session holds one; a deque would cost 600 bytes more each).
        self._ready: list[Event] = []
        self._awaiting: type | None = None  # event type waiting for reply()
        self._tls_active = False
        self._tls_pending = False  # STARTTLS answered, tls_started() not yet called
        self._eof = False
        self._discarding = False  # inside a command line over max_line_bytes
        self._recipients = 0  # accepted recipients of the transaction
        # Content state (DATA).
        self._line_start = True  # next buffered byte begins a client (CRLF) line
        self._segment_start = False  # ... begins a line after a bare CR/LF or NULs
        self._dot_line = False  # the line so far is a lone "." (NULs removed)
        self._message_bytes = 0  # content bytes as sent, so far
        self._abort: Reply | None = None  # draining to the terminator

    # --- Public API -----------------------------------------------------

    def greeting(self) -> bytes:
        """The 220 greeting, ``b"220 <domain> ESMTP\\r\\n"``."""
        return Reply(220, "", f"{self.domain} ESMTP").to_bytes()

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the client; b"" means the peer closed. Input
        after QUIT, after the close, or between STARTTLS and `tls_started()`
        is discarded."""
        if self._state is State.CLOSED or self._eof or self._tls_pending:
            return
        if not data:
            self._eof = True
            return
        self._buffer += data

    def events(self) -> Iterator[Event]:
        """Yield the events that the buffered input makes, in order.

        Stops after an event that needs `reply()` (MailFrom, RcptTo,
        DataStart, DataEnd) until `reply()` is called: call it in the loop
        body and the same iteration goes on. Also stops after StartTls until
        `tls_started()`. Never raises on client input.
        """
        ready = self._ready
        while True:
            if ready:
                yield ready.pop(0)
                continue
            if self._awaiting is not None or self._tls_pending or self._state is State.CLOSED:
                return
            if not self._advance():
                return

    def reply(self, reply: Reply) -> None:
        """Give the backend's reply to the pending MailFrom, RcptTo, DataStart
        or DataEnd, and make the move it decides (see `State`). The reply's
        bytes join the outbound buffer in command order: `data_to_send()`
        drains them with the protocol's own replies.

        Raises ProtocolError when no event awaits a reply.
        """
        awaiting = self._awaiting
        if awaiting is None:
            raise ProtocolError(f"reply({reply}) with no event awaiting a reply")
        self._awaiting = None
        self._outbound += reply.to_bytes()
        completed = 200 <= reply.code < 300
        if awaiting is MailFrom:
            if completed:
                self._state = State.TRANSACTION
                self._recipients = 0
        elif awaiting is RcptTo:
            if completed:
                self._recipients += 1
        elif awaiting is DataStart and reply.code == 354:
            self._state = State.DATA
            self._line_start = True
            self._segment_start = False
            self._dot_line = False
            self._message_bytes = 0
            self._abort = None
        else:  # DataEnd answered, or DATA refused: a new envelope per message
            self._end_transaction()

    def data_to_send(self) -> bytes:
        """Drain every reply queued so far, in the client's command order."""
        out = bytes(self._outbound)
        self._outbound.clear()
        return out

    def tls_started(self) -> None:
        """The socket is wrapped: back to "no EHLO yet", transaction cleared.
        Raises ProtocolError when no STARTTLS was answered."""
        if not self._tls_pending:
            raise ProtocolError("tls_started() without STARTTLS")
        self._tls_pending = False
        self._tls_active = True
        self._state = State.START
        self._recipients = 0

    @property
    def closed(self) -> bool:
        """True after QUIT or the peer's close, once every event and reply
        has been taken: the shell closes the socket."""
        return self._state is State.CLOSED and not self._ready and not self._outbound

    @property
    def state(self) -> State:
        """Where the session stands in the command sequence (see `State`)."""
        return self._state

    @property
    def in_transaction(self) -> bool:
        """True from a MAIL answered 2xx until the transaction ends (see
        `State`): states TRANSACTION and DATA."""
        state = self._state
        return state is State.TRANSACTION or state is State.DATA

    @property
    def in_data(self) -> bool:
        """True from the 354 to the reply to the final dot (state DATA)."""
        return self._state is State.DATA

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def buffered_bytes(self) -> int:
        """Input held and not yet parsed (for tests and metrics)."""
        return len(self._buffer)

    # --- Input ----------------------------------------------------------

    def _advance(self) -> bool:
        """Parse one step of buffered input; False when more input is needed."""
        if self._state is State.DATA:
            progressed = self._advance_data()
        else:
            progressed = self._advance_command()
        if progressed:
            return True
        if self._eof:
            self._state = State.CLOSED
            self._buffer.clear()
            self._ready.append(ConnectionClosed())
            return True
        return False

    def _advance_command(self) -> bool:
        """Handle one command line. The buffer holds at most max_line_bytes of
        an unfinished line: beyond that the line is discarded up to its LF and
        answered 500 once, so the session stays in sync."""
        buf = self._buffer
        if self._discarding:
            end = buf.find(b"\n")
            if end < 0:
                buf.clear()
                return False
            del buf[: end + 1]
            self._discarding = False
            self._send(replies.LINE_TOO_LONG)
            return True
        limit = self.limits.max_line_bytes
        end = buf.find(b"\n", 0, limit)
        if end < 0:
            if len(buf) >= limit:  # with its LF, the line will exceed the limit
                self._discarding = True
                return True
            return False
        line = bytes(buf[:end])
        del buf[: end + 1]
        self._command(line.rstrip(b"\r \t"))
        return True

    def _command(self, line: bytes) -> None:
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()  # bytes.upper(): ASCII only, no Unicode case folding
        handler = self._HANDLERS.get(verb)
        if handler is None:
            self._send(replies.UNKNOWN_COMMAND)
        elif verb not in _ALLOWED[self._state]:
            self._send(replies.BAD_SEQUENCE)
        else:
            handler(self, arg.lstrip(b" ").decode("utf-8", "surrogateescape"))

    def _advance_data(self) -> bool:
        """Pass content on up to the terminator, as large chunks.

        Well-formed CRLF content is found so with four C-level scans (CR,
        LF, CRLF, NUL) and leaves byte for byte; only a block with a bare CR
        or LF or a NUL takes the per-line slow path. At most DATA_HOLD_BYTES
        are held back.
        """
        buf = self._buffer
        if not buf:
            return False
        if self._line_start:
            if buf.startswith(b".\r\n"):
                del buf[:3]
                self._end_data()
                return True
            if len(buf) < 3 and b".\r\n".startswith(buf):
                return False  # b"." or b".\r": maybe the terminator
        found = buf.find(_TERMINATOR)
        if found >= 0:
            end = found + 2  # the CRLF ends the last content line
        else:
            end = len(buf) - _held_back(buf)
            if end == 0:
                return False
        if self._abort is not None:  # draining: drop, hold nothing else
            self._line_start = buf.endswith(b"\r\n", 0, end)
            del buf[:end]
            return True
        size = self._message_bytes + end
        if size > self.limits.max_message_bytes:
            return self._abort_data(replies.MESSAGE_TOO_BIG)
        block = self._take(end)
        carriage_returns = block.count(b"\r")
        nul = b"\x00" in block
        if (
            nul
            or self._segment_start
            or self._dot_line
            or carriage_returns != block.count(b"\n")
            or carriage_returns != block.count(b"\r\n")
        ):
            if self.limits.bare_newline == "reject":
                # Only normalize mode leaves _segment_start or _dot_line set.
                return self._abort_data(replies.NUL_IN_CONTENT if nul else replies.BARE_NEWLINE)
            chunk = self._normalize(block, nul)
        else:
            chunk = block
        del buf[:end]
        self._message_bytes = size
        self._line_start = block.endswith(b"\r\n")
        if chunk:  # empty when the block held nothing but NULs
            self._ready.append(DataChunk(chunk))
        return True

    def _take(self, end: int) -> bytes:
        """The first `end` buffered bytes, copied once."""
        view = memoryview(self._buffer)
        try:
            return bytes(view[:end])
        finally:
            view.release()

    def _normalize(self, block: bytes, nul: bool) -> bytes:
        """Rewrite a block holding bare CR/LF or NUL (bare_newline: normalize).

        Client lines end with CRLF; a bare CR or LF splits one into segments
        that become lines of their own. NULs are removed from every segment
        first, then the dots are looked at:

        - the first segment of a client line is sent as the client
          dot-stuffed it when it began with a dot, except that a lone "."
          (b".\\x00" included) would be an end of data downstream and becomes
          ".."; when it did not begin with a dot but does once its NULs are
          gone (b"\\x00."), it gets one;
        - every later segment that starts with "." gets one more.

        So b"\\n.\\n" is a line holding a dot, sent as b"..", no NUL goes on
        and no CRLF.CRLF is ever made.

        A block may begin and end mid-line, never with a CR (held back) nor
        right after a lone leading "." (held back as a possible terminator).
        Where a line stands at the end of a block is kept across blocks:
        `_line_start` (nothing of it read yet), `_segment_start` (what was
        read of it was only NULs, or it follows a bare CR/LF: a leading dot
        will get one more) and `_dot_line` (a client line that is "." so far
        after its NULs: a dot more if it ends there).
        """
        out = []
        lines = block.split(b"\r\n")
        last = len(lines) - 1
        segment_start = dot_line = False  # for the piece that ends the block
        for n, line in enumerate(lines):
            segments = line.replace(b"\r", b"\n").split(b"\n")
            final_k = len(segments) - 1 if n == last else -1
            for k, raw in enumerate(segments):
                segment = raw.replace(b"\x00", b"") if nul else raw
                final = k == final_k  # this line goes on in the next block
                if k == 0 and n == 0 and not self._line_start:
                    # The rest of the line the previous block ended in.
                    if self._dot_line:
                        if not segment and not final:
                            segment = b"."  # the line is "." after all: ".."
                        dot_line = final and not segment
                    elif self._segment_start:
                        if segment[:1] == b".":
                            segment = b"." + segment
                        segment_start = final and not segment
                elif k == 0 and raw[:1] == b".":  # a client line, dot-stuffed by the client
                    if segment == b".":
                        if final:
                            dot_line = True
                        else:
                            segment = b".."
                elif segment[:1] == b".":  # a segment, or a client line once NUL-free
                    segment = b"." + segment
                else:
                    # Only NULs so far: a dot that comes next will need one more.
                    segment_start = final and not segment and bool(raw or k)
                segments[k] = segment
            out.append(b"\r\n".join(segments))
        self._segment_start = segment_start
        self._dot_line = dot_line
        return b"\r\n".join(out)

    def _abort_data(self, reply: Reply) -> bool:
        self._abort = reply
        self._segment_start = False
        self._dot_line = False
        self._ready.append(DataAbort(reply))
        return True

    def _end_data(self) -> None:
        """The terminator arrived."""
        abort = self._abort
        self._abort = None
        if abort is not None:
            self._end_transaction()
            self._send(abort)
        else:  # the transaction ends when the final reply is given
            self._awaiting = DataEnd
            self._ready.append(DataEnd())

    def _end_transaction(self) -> None:
        self._state = State.GREETED
        self._recipients = 0

    # --- Output ---------------------------------------------------------

    def _send(self, reply: Reply) -> None:
        self._outbound += reply.to_bytes()

    def _ehlo_reply(self) -> Reply:
        lines = [
            self.domain,
            "PIPELINING",
            f"SIZE {self.limits.max_message_bytes}",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
        ]
        if self.limits.tls_available and not self._tls_active:
            lines.append("STARTTLS")
        return Reply(250, "", "\n".join(lines))

    # --- Commands (each gets its argument, decoded, leading spaces off) --

    def _hello(self, arg: str, extended: bool) -> None:
        if not arg or _UNCLEAN.search(arg):
            self._send(replies.HELO_SYNTAX)
            return
        if self._state is State.TRANSACTION:
            self._ready.append(Reset())
        self._end_transaction()
        self._send(self._ehlo_reply() if extended else Reply(250, "", self.domain))
        self._ready.append(Hello(arg, extended))

    def _ehlo(self, arg: str) -> None:
        self._hello(arg, extended=True)

    def _helo(self, arg: str) -> None:
        self._hello(arg, extended=False)

    def _mail(self, arg: str) -> None:
        if self.limits.require_tls and not self._tls_active:
            self._send(replies.TLS_REQUIRED)
            return
        match = _MAIL_FROM.match(arg)
        if match is None:
            self._send(replies.MAIL_SYNTAX)
            return
        sender, param_text = match.groups()
        if _UNCLEAN.search(sender):
            self._send(replies.BAD_ADDRESS)
            return
        params = _parse_params(param_text or "")
        if params is None:
            self._send(replies.MAIL_SYNTAX)
            return
        for keyword, value in params.items():
            if keyword == "SIZE":
                if value is None or not value.isdigit() or not value.isascii() or len(value) > _MAX_SIZE_DIGITS:
                    self._send(replies.MAIL_SYNTAX)
                    return
                if int(value) > self.limits.max_message_bytes:
                    self._send(replies.MESSAGE_TOO_BIG)
                    return
            elif keyword == "BODY":
                if value is None or value.upper() not in _BODY_TYPES:
                    self._send(replies.MAIL_SYNTAX)
                    return
                params["BODY"] = value.upper()
            elif keyword == "SMTPUTF8":
                if value is not None:
                    self._send(replies.MAIL_SYNTAX)
                    return
            else:
                self._send(replies.UNKNOWN_PARAMETER)
                return
        self._awaiting = MailFrom
        self._ready.append(MailFrom(_strip_source_route(sender), params))

    def _rcpt(self, arg: str) -> None:
        match = _RCPT_TO.match(arg)
        if match is None or not match.group(1):
            self._send(replies.RCPT_SYNTAX)
            return
        recipient, param_text = match.groups()
        if _UNCLEAN.search(recipient):
            self._send(replies.BAD_ADDRESS)
            return
        params = _parse_params(param_text or "")
        if params is None:
            self._send(replies.RCPT_SYNTAX)
            return
        if params:  # no DSN or other RCPT extension is advertised
            self._send(replies.UNKNOWN_PARAMETER)
            return
        if self._recipients >= self.limits.max_recipients:
            self._send(replies.TOO_MANY_RECIPIENTS)
            return
        self._awaiting = RcptTo
        self._ready.append(RcptTo(_strip_source_route(recipient), params))

    def _data(self, arg: str) -> None:
        if arg:
            self._send(replies.SYNTAX_ERROR)
        elif not self._recipients:
            self._send(replies.NO_VALID_RECIPIENTS)
        else:
            self._awaiting = DataStart
            self._ready.append(DataStart())

    def _rset(self, arg: str) -> None:
        if arg:
            self._send(replies.SYNTAX_ERROR)
            return
        if self._state is State.TRANSACTION:
            self._end_transaction()
        self._send(replies.OK)
        self._ready.append(Reset())

    def _noop(self, arg: str) -> None:  # RFC 5321: NOOP may carry a string
        self._send(replies.OK)

    def _quit(self, arg: str) -> None:  # arguments ignored: let a client leave
        self._send(replies.CLOSING)
        self._state = State.CLOSED
        self._buffer.clear()
        self._ready.append(Quit())

    def _vrfy(self, arg: str) -> None:
        self._send(replies.VRFY_CANNOT if arg else replies.SYNTAX_ERROR)

    def _help(self, arg: str) -> None:
        self._send(replies.HELP)

    def _starttls(self, arg: str) -> None:
        if arg:
            self._send(replies.SYNTAX_ERROR)
        elif self._tls_active:
            self._send(replies.TLS_ALREADY_ACTIVE)
        elif not self.limits.tls_available:
            self._send(replies.TLS_UNAVAILABLE)
        else:
            self._send(replies.READY_TLS)
            self._buffer.clear()  # pipelined behind STARTTLS: never executed
            self._tls_pending = True
            self._ready.append(StartTls())

    # Verb -> handler, built once (aiosmtpd's _smtp_methods).
    _HANDLERS: ClassVar[dict[bytes, Callable[[ServerProtocol, str], None]]] = {
        b"EHLO": _ehlo,
        b"HELO": _helo,
        b"MAIL": _mail,
        b"RCPT": _rcpt,
        b"DATA": _data,
        b"RSET": _rset,
        b"NOOP": _noop,
        b"QUIT": _quit,
        b"VRFY": _vrfy,
        b"HELP": _help,
        b"STARTTLS": _starttls,
    }
