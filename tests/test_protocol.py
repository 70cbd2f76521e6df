"""Tests for the sans-IO SMTP server (smtpdup.protocol) and smtpdup.reply.

A `Driver` plays the gevent shell with a fake backend that accepts
everything (or what a test tells it), feeding bytes in whatever pieces a test
chooses. Properties run with hypothesis, each case also a byte at a time.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from smtpdup import reply as replies
from smtpdup.protocol import (
    DATA_HOLD_BYTES,
    ConnectionClosed,
    DataAbort,
    DataChunk,
    DataEnd,
    DataStart,
    Event,
    Hello,
    Limits,
    MailFrom,
    ProtocolError,
    Quit,
    RcptTo,
    Reset,
    ServerProtocol,
    StartTls,
    State,
)
from smtpdup.reply import Reply

DOMAIN = "relay.example"
ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\nDATA\r\n"
QUEUED = Reply(250, "2.0.0", "Ok: queued")


def accept_all(event: Event) -> Reply | None:
    """The fake backend: accepts every sender, recipient and message."""
    if isinstance(event, MailFrom):
        return Reply(250, "2.1.0", "Ok")
    if isinstance(event, RcptTo):
        return Reply(250, "2.1.5", "Ok")
    if isinstance(event, DataStart):
        return replies.START_DATA
    if isinstance(event, DataEnd):
        return QUEUED
    return None


class Driver:
    """A protocol with a fake backend, run the way session.py runs it."""

    def __init__(
        self,
        limits: Limits | None = None,
        backend: Callable[[Event], Reply | None] = accept_all,
    ) -> None:
        self.proto = ServerProtocol(limits or Limits(), DOMAIN)
        self.backend = backend
        self.out = bytearray(self.proto.greeting())
        self.events: list[Event] = []
        self.writes = 0  # data_to_send() results that were not empty

    def feed(self, data: bytes) -> list[Event]:
        """Feed one read; returns its events. Replies go to self.out, all of
        one read in one data_to_send(), like the shell's single write."""
        self.proto.receive_data(data)
        new: list[Event] = []
        started_tls = False
        for event in self.proto.events():
            new.append(event)
            answer = self.backend(event)
            if answer is not None:
                assert self.proto.reply(answer) is None  # the bytes leave via data_to_send()
            started_tls |= isinstance(event, StartTls)
        # Every buffer is bounded once the events of a read are taken: the
        # content held back may begin the terminator; a command line is kept
        # only while it is within the limit.
        if self.proto.in_data:
            assert self.proto.buffered_bytes <= DATA_HOLD_BYTES
        else:
            assert self.proto.buffered_bytes < self.proto.limits.max_line_bytes
        pending = self.proto.data_to_send()
        if pending:
            self.writes += 1
            self.out += pending
        if started_tls:
            self.proto.tls_started()
        self.events += new
        return new

    def feed_pieces(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            self.feed(piece)

    def codes(self) -> list[str]:
        """The reply codes sent after the greeting, final lines only."""
        return reply_codes(bytes(self.out))[1:]

    def content(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, DataChunk))


def reply_codes(out: bytes) -> list[str]:
    """'250 2.1.0' style (code plus enhanced code if any), one per reply."""
    codes = []
    for line in out.split(b"\r\n")[:-1]:
        if line[3:4] == b" " or len(line) == 3:
            m = re.match(rb"(\d{3})(?: ([245]\.\d+\.\d+))?", line)
            assert m, line
            codes.append(" ".join(g.decode() for g in m.groups() if g))
    return codes


def in_data(limits: Limits | None = None, **kw) -> Driver:
    driver = Driver(limits, **kw)
    driver.feed(ENVELOPE)
    assert driver.proto.in_data
    driver.events.clear()
    driver.out.clear()
    return driver


def greeted(limits: Limits | None = None, **kw) -> Driver:
    driver = Driver(limits, **kw)
    driver.feed(b"EHLO client.example\r\n")
    driver.events.clear()
    driver.out.clear()
    return driver


def codes_of(driver: Driver) -> list[str]:
    return reply_codes(bytes(driver.out))


# --- reply.py ---------------------------------------------------------------


def test_reply_to_bytes_single_and_multiline() -> None:
    assert Reply(451, "4.4.1", "try later").to_bytes() == b"451 4.4.1 try later\r\n"
    assert Reply(250, "", "a\nb").to_bytes() == b"250-a\r\n250 b\r\n"
    assert Reply(550, "5.7.1", "a\nb").to_bytes() == b"550-5.7.1 a\r\n550 5.7.1 b\r\n"
    assert Reply(354, "", "go").to_bytes() == b"354 go\r\n"
    assert Reply(250).to_bytes() == b"250\r\n"


@given(st.text())
def test_reply_to_bytes_never_emits_bare_cr_or_lf(text: str) -> None:
    wire = Reply(554, "5.0.0", text).to_bytes()
    assert wire.endswith(b"\r\n")
    assert wire.count(b"\r") == wire.count(b"\n") == wire.count(b"\r\n")
    for line in wire.split(b"\r\n")[:-1]:
        assert line[:3] == b"554" and line[3:4] in (b" ", b"-")


def test_reply_from_smtplib() -> None:
    assert Reply.from_smtplib(250, b"2.1.0 Ok") == Reply(250, "2.1.0", "Ok")
    assert Reply.from_smtplib(250, b"Ok") == Reply(250, "", "Ok")
    multi = Reply.from_smtplib(550, b"5.7.1 first\n5.7.1 second\nthird")
    assert multi == Reply(550, "5.7.1", "first\nsecond\nthird")
    assert multi.to_bytes() == b"550-5.7.1 first\r\n550-5.7.1 second\r\n550 5.7.1 third\r\n"
    assert Reply.from_smtplib(554, b"bad \xff byte").text == "bad \ufffd byte"
    assert Reply.from_smtplib(250, b"2.0.0") == Reply(250, "2.0.0", "")


def test_reply_str_and_classes() -> None:
    assert str(Reply(451, "4.4.1", "a\nb")) == "451 4.4.1 a / b"
    assert str(replies.START_DATA) == "354 End data with <CR><LF>.<CR><LF>"
    assert replies.OK.is_positive and replies.START_DATA.is_positive
    assert replies.PRIMARY_UNAVAILABLE.is_transient and not replies.PRIMARY_UNAVAILABLE.is_permanent
    assert replies.BAD_SEQUENCE.is_permanent and not replies.BAD_SEQUENCE.is_positive


@pytest.mark.parametrize(
    "code, completed, positive, transient, permanent",
    [
        (220, True, True, False, False),
        (250, True, True, False, False),
        (299, True, True, False, False),
        (354, False, True, False, False),
        (421, False, False, True, False),
        (451, False, False, True, False),
        (499, False, False, True, False),
        (500, False, False, False, True),
        (550, False, False, False, True),
        (599, False, False, False, True),
    ],
)
def test_reply_predicates_follow_the_first_digit(code, completed, positive, transient, permanent):
    reply = Reply(code)
    assert (reply.is_completed, reply.is_positive, reply.is_transient, reply.is_permanent) == (
        completed, positive, transient, permanent)


@pytest.mark.parametrize(
    "name, code, enhanced",
    [
        ("BAD_SEQUENCE", 503, "5.5.1"),
        ("UNKNOWN_COMMAND", 500, "5.5.2"),
        ("LINE_TOO_LONG", 500, "5.5.2"),
        ("SYNTAX_ERROR", 501, "5.5.4"),
        ("NO_VALID_RECIPIENTS", 554, "5.5.1"),
        ("MESSAGE_TOO_BIG", 552, "5.3.4"),
        ("TOO_MANY_RECIPIENTS", 452, "4.5.3"),
        ("BARE_NEWLINE", 550, "5.5.2"),
        ("NUL_IN_CONTENT", 550, "5.6.0"),
        ("PRIMARY_UNAVAILABLE", 451, "4.4.1"),
        ("LOCAL_ERROR", 451, "4.3.0"),
        ("SMTPUTF8_UNSUPPORTED", 553, "5.6.7"),
        ("TLS_REQUIRED", 530, "5.7.0"),
        ("IDLE_TIMEOUT", 421, "4.4.2"),
        ("SHUTTING_DOWN", 421, "4.3.2"),
        ("TOO_MANY_CONNECTIONS", 421, "4.7.0"),
        ("ACCESS_DENIED", 554, "5.7.1"),
        ("VRFY_CANNOT", 252, "2.5.0"),
        ("START_DATA", 354, ""),
        ("CLOSING", 221, "2.0.0"),
        ("READY_TLS", 220, "2.0.0"),
        ("TLS_UNAVAILABLE", 454, "4.7.0"),
    ],
)
def test_canned_replies(name: str, code: int, enhanced: str) -> None:
    canned = getattr(replies, name)
    assert (canned.code, canned.enhanced) == (code, enhanced)


# --- Commands ---------------------------------------------------------------


def test_greeting() -> None:
    assert ServerProtocol(Limits(), DOMAIN).greeting() == b"220 relay.example ESMTP\r\n"


def test_ehlo_advertises_extensions_one_per_line() -> None:
    driver = Driver(Limits(max_message_bytes=1000))
    assert driver.feed(b"EHLO client.example\r\n") == [Hello("client.example", True)]
    assert bytes(driver.out).split(b"\r\n", 1)[1] == (
        b"250-relay.example\r\n250-PIPELINING\r\n250-SIZE 1000\r\n250-8BITMIME\r\n"
        b"250-SMTPUTF8\r\n250 ENHANCEDSTATUSCODES\r\n"
    )


def test_ehlo_advertises_starttls_only_when_available_and_inactive() -> None:
    driver = greeted(Limits(tls_available=True))
    driver.feed(b"EHLO again\r\n")
    assert bytes(driver.out).endswith(b"250-ENHANCEDSTATUSCODES\r\n250 STARTTLS\r\n")
    driver.feed(b"STARTTLS\r\n")
    assert driver.proto.tls_active
    driver.out.clear()
    driver.feed(b"EHLO again\r\n")
    assert b"STARTTLS" not in driver.out


def test_helo_is_one_line() -> None:
    driver = Driver()
    assert driver.feed(b"HELO client.example\r\n") == [Hello("client.example", False)]
    assert bytes(driver.out).split(b"\r\n", 1)[1] == b"250 relay.example\r\n"


@pytest.mark.parametrize("line", [b"EHLO", b"HELO", b"EHLO   ", b"EHLO a\x01b", b"HELO \xff\xfe"])
def test_hello_syntax(line: bytes) -> None:
    driver = Driver()
    assert driver.feed(line + b"\r\n") == []
    assert driver.codes() == ["501 5.5.4"]


def test_commands_are_case_insensitive() -> None:
    driver = Driver()
    driver.feed(b"ehlo x\r\nmail from:<a@b>\r\nRcPt To:<c@d>\r\ndata\r\n")
    assert driver.codes() == ["250", "250 2.1.0", "250 2.1.5", "354"]


@pytest.mark.parametrize(
    "line, code",
    [
        (b"NOOP", "250 2.0.0"),
        (b"NOOP anything", "250 2.0.0"),
        (b"VRFY postmaster", "252 2.5.0"),
        (b"VRFY", "501 5.5.4"),
        (b"HELP", "214 2.0.0"),
        (b"HELP MAIL", "214 2.0.0"),
        (b"RSET", "250 2.0.0"),
        (b"RSET now", "501 5.5.4"),
        (b"EXPN list", "500 5.5.2"),
        (b"FOO", "500 5.5.2"),
        (b"", "500 5.5.2"),
        (b"\xff\xfe", "500 5.5.2"),
        (b"STARTTLS", "454 4.7.0"),
    ],
)
def test_simple_verbs(line: bytes, code: str) -> None:
    driver = greeted()
    driver.feed(line + b"\r\n")
    assert codes_of(driver) == [code]


def test_rset_clears_the_envelope() -> None:
    driver = greeted()
    driver.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRSET\r\nRCPT TO:<c@d>\r\nMAIL FROM:<e@f>\r\n")
    assert codes_of(driver) == ["250 2.1.0", "250 2.1.5", "250 2.0.0", "503 5.5.1", "250 2.1.0"]
    assert [type(e) for e in driver.events] == [MailFrom, RcptTo, Reset, MailFrom]


def test_quit_closes_after_the_reply_is_taken_and_ignores_the_rest() -> None:
    proto = ServerProtocol(Limits(), DOMAIN)
    proto.receive_data(b"QUIT\r\nNOOP\r\n")
    assert list(proto.events()) == [Quit()]
    assert not proto.closed  # the 221 is still to be sent
    assert proto.data_to_send() == b"221 2.0.0 Bye\r\n"
    assert proto.closed
    proto.receive_data(b"NOOP\r\n")
    assert list(proto.events()) == [] and proto.data_to_send() == b""


def test_peer_close_gives_connection_closed_once() -> None:
    driver = in_data()
    assert driver.feed(b"partial content") == [DataChunk(b"partial content")]
    assert driver.feed(b"") == [ConnectionClosed()]
    assert driver.proto.closed
    assert driver.feed(b"") == []


def test_peer_close_after_pipelined_commands_answers_them_first() -> None:
    driver = Driver()
    driver.proto.receive_data(b"EHLO x\r\nNOOP\r\nNOO")
    driver.feed(b"")
    assert [type(e) for e in driver.events] == [Hello, ConnectionClosed]
    assert driver.codes() == ["250", "250 2.0.0"]
    assert driver.proto.closed


# The sequence table: (commands that set up the state, command, reply).
SEQUENCE_CASES = [
    (b"", b"MAIL FROM:<a@b>", "503 5.5.1"),
    (b"", b"RCPT TO:<a@b>", "503 5.5.1"),
    (b"", b"DATA", "503 5.5.1"),
    (b"", b"STARTTLS", "503 5.5.1"),
    (b"", b"NOOP", "250 2.0.0"),
    (b"", b"RSET", "250 2.0.0"),
    (b"EHLO x\r\n", b"RCPT TO:<a@b>", "503 5.5.1"),
    (b"EHLO x\r\n", b"DATA", "503 5.5.1"),
    (b"EHLO x\r\n", b"MAIL FROM:<a@b>", "250 2.1.0"),
    (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"MAIL FROM:<a@b>", "503 5.5.1"),
    (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"STARTTLS", "503 5.5.1"),
    (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"RCPT TO:<a@b>", "250 2.1.5"),
    (b"EHLO x\r\nMAIL FROM:<a@b>\r\n", b"DATA", "554 5.5.1"),
    (b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@b>\r\n", b"DATA", "354"),
    (b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@b>\r\n", b"EHLO y", "250"),
    (b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<a@b>\r\nRSET\r\n", b"RCPT TO:<a@b>", "503 5.5.1"),
]


@pytest.mark.parametrize("setup, line, code", SEQUENCE_CASES)
def test_sequence_table(setup: bytes, line: bytes, code: str) -> None:
    driver = Driver(Limits(tls_available=True))
    if setup:
        driver.feed(setup)
    before = len(driver.codes())
    driver.feed(line + b"\r\n")
    assert driver.codes()[before:] == [code]


# The sequence rules, written out: the verbs each state accepts. Every known
# verb is sent in every state that reads commands; one outside its row gets
# 503 5.5.1 and leaves the state as it was.
ACCEPTED_VERBS = {
    State.START: {"EHLO", "HELO", "RSET", "NOOP", "QUIT", "VRFY", "HELP"},
    State.GREETED: {"EHLO", "HELO", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "MAIL", "STARTTLS"},
    State.TRANSACTION: {"EHLO", "HELO", "RSET", "NOOP", "QUIT", "VRFY", "HELP", "RCPT", "DATA"},
}
VERB_LINES = {
    "EHLO": b"EHLO x", "HELO": b"HELO x", "MAIL": b"MAIL FROM:<a@b>", "RCPT": b"RCPT TO:<c@d>",
    "DATA": b"DATA", "RSET": b"RSET", "NOOP": b"NOOP", "QUIT": b"QUIT", "VRFY": b"VRFY u",
    "HELP": b"HELP", "STARTTLS": b"STARTTLS",
}
# Reaches the state; the transaction has a recipient, so DATA is not 554.
SETUP = {
    State.START: b"",
    State.GREETED: b"EHLO x\r\n",
    State.TRANSACTION: b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n",
}


@pytest.mark.parametrize("state", list(ACCEPTED_VERBS))
@pytest.mark.parametrize("verb", list(VERB_LINES))
def test_every_verb_in_every_command_state(state: State, verb: str) -> None:
    driver = Driver(Limits(tls_available=True))
    if SETUP[state]:
        driver.feed(SETUP[state])
    assert driver.proto.state is state
    driver.out.clear()
    driver.feed(VERB_LINES[verb] + b"\r\n")
    refused = bytes(driver.out) == replies.BAD_SEQUENCE.to_bytes()
    assert refused == (verb not in ACCEPTED_VERBS[state]), driver.out
    if refused:
        assert driver.proto.state is state


def answers(**by_event: Reply) -> Callable[[Event], Reply | None]:
    """A backend that answers the named events (MailFrom=..., DataEnd=...)
    as told and accepts the rest."""

    def backend(event: Event) -> Reply | None:
        return by_event.get(type(event).__name__) or accept_all(event)

    return backend


REFUSED = Reply(451, "4.4.1", "later")
OPEN = b"EHLO x\r\nMAIL FROM:<a@b>\r\n"  # state TRANSACTION, no recipient yet
READY = OPEN + b"RCPT TO:<c@d>\r\n"  # ... with one recipient
# (limits, backend answers, setup, line, state after, in_transaction after):
# each move of State's table, and commands that move nothing.
MOVES = [
    (Limits(), {}, b"", b"EHLO x", State.GREETED, False),
    (Limits(), {}, b"", b"HELO x", State.GREETED, False),
    (Limits(), {}, b"", b"EHLO", State.START, False),  # 501: not accepted
    (Limits(), {}, b"", b"RSET", State.START, False),
    (Limits(), {}, b"EHLO x\r\n", b"MAIL FROM:<a@b>", State.TRANSACTION, True),
    (Limits(), {"MailFrom": REFUSED}, b"EHLO x\r\n", b"MAIL FROM:<a@b>", State.GREETED, False),
    (Limits(), {}, b"EHLO x\r\n", b"MAIL FROM:<a@b> BOGUS=1", State.GREETED, False),  # 555
    (Limits(tls_available=True), {}, b"EHLO x\r\n", b"STARTTLS", State.START, False),
    (Limits(), {}, b"EHLO x\r\n", b"STARTTLS", State.GREETED, False),  # 454: no TLS here
    (Limits(), {}, b"EHLO x\r\n", b"RSET", State.GREETED, False),
    (Limits(), {}, OPEN, b"RCPT TO:<c@d>", State.TRANSACTION, True),
    (Limits(), {"RcptTo": REFUSED}, OPEN, b"RCPT TO:<c@d>", State.TRANSACTION, True),
    (Limits(), {}, OPEN, b"DATA", State.TRANSACTION, True),  # 554: no recipient
    (Limits(), {}, READY, b"DATA", State.DATA, True),
    (Limits(), {"DataStart": REFUSED}, READY, b"DATA", State.GREETED, False),
    (Limits(), {}, READY, b"RSET", State.GREETED, False),
    (Limits(), {}, READY, b"EHLO y", State.GREETED, False),
    (Limits(), {}, READY, b"HELO y", State.GREETED, False),
    (Limits(), {}, READY, b"NOOP", State.TRANSACTION, True),
    (Limits(), {}, READY + b"DATA\r\n", b"RSET", State.DATA, True),  # content, not a command
    (Limits(), {}, READY + b"DATA\r\nbody\r\n", b".", State.GREETED, False),
    (Limits(), {"DataEnd": REFUSED}, READY + b"DATA\r\n", b".", State.GREETED, False),
    (Limits(max_message_bytes=3), {}, READY + b"DATA\r\ntoo long\r\n", b".", State.GREETED, False),
    (Limits(), {}, b"", b"QUIT", State.CLOSED, False),
    (Limits(), {}, READY, b"QUIT", State.CLOSED, False),
]


@pytest.mark.parametrize("limits, answered, setup, line, state, in_transaction", MOVES)
def test_state_moves(limits, answered, setup, line, state, in_transaction) -> None:
    driver = Driver(limits, backend=answers(**answered))
    if setup:
        driver.feed(setup)
    driver.feed(line + b"\r\n")
    assert driver.proto.state is state
    assert driver.proto.in_transaction is in_transaction
    assert driver.proto.in_data is (state is State.DATA)


@pytest.mark.parametrize("setup", [b"", b"EHLO x\r\n", READY, READY + b"DATA\r\nbody"])
def test_peer_close_moves_any_state_to_closed(setup: bytes) -> None:
    driver = Driver()
    if setup:
        driver.feed(setup)
    driver.feed(b"")
    assert driver.proto.state is State.CLOSED and not driver.proto.in_transaction


def test_an_event_moves_nothing_until_its_reply() -> None:
    proto = ServerProtocol(Limits(), DOMAIN)
    proto.receive_data(READY + b"DATA\r\n.\r\n")
    seen = []
    for event in proto.events():
        seen.append((type(event), proto.state))
        answer = accept_all(event)
        if answer is not None:
            proto.reply(answer)
            seen.append((answer.code, proto.state))
    assert seen == [
        (Hello, State.GREETED),
        (MailFrom, State.GREETED), (250, State.TRANSACTION),
        (RcptTo, State.TRANSACTION), (250, State.TRANSACTION),
        (DataStart, State.TRANSACTION), (354, State.DATA),
        (DataEnd, State.DATA), (250, State.GREETED),
    ]


@pytest.mark.parametrize(
    "line, sender, params",
    [
        (b"MAIL FROM:<a@b>", "a@b", {}),
        (b"MAIL FROM: <a@b>", "a@b", {}),
        (b"MAIL FROM:<>", "", {}),
        (b"mail from:<A@B> size=100 body=8bitmime smtputf8", "A@B", {"SIZE": "100", "BODY": "8BITMIME", "SMTPUTF8": None}),
        (b"MAIL FROM:<a@b> BODY=7BIT", "a@b", {"BODY": "7BIT"}),
        (b"MAIL FROM:<@relay,@other:a@b>", "a@b", {}),
        (b'MAIL FROM:<"odd > local"@b>', '"odd > local"@b', {}),
        ("MAIL FROM:<jörg@bücher.example> SMTPUTF8".encode(), "jörg@bücher.example", {"SMTPUTF8": None}),
        (b"MAIL FROM:<a@b> SIZE=26214400", "a@b", {"SIZE": "26214400"}),
    ],
)
def test_mail_accepted(line: bytes, sender: str, params: dict) -> None:
    driver = greeted()
    assert driver.feed(line + b"\r\n") == [MailFrom(sender, params)]


@pytest.mark.parametrize(
    "line, code",
    [
        (b"MAIL FROM:a@b", "501 5.5.4"),
        (b"MAIL TO:<a@b>", "501 5.5.4"),
        (b"MAIL FROM:<a@b", "501 5.5.4"),
        (b"MAIL FROM:<a b@c>", "501 5.5.4"),
        (b"MAIL FROM:<a@b>x", "501 5.5.4"),
        (b"MAIL", "501 5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=abc", "501 5.5.4"),
        (b"MAIL FROM:<a@b> SIZE", "501 5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=1 SIZE=2", "501 5.5.4"),
        (b"MAIL FROM:<a@b> BODY=BINARYMIME", "501 5.5.4"),
        (b"MAIL FROM:<a@b> SMTPUTF8=yes", "501 5.5.4"),
        (b"MAIL FROM:<a@b> =x", "501 5.5.4"),
        (b"MAIL FROM:<a@b> RET=HDRS", "555 5.5.4"),
        (b"MAIL FROM:<a@b> SIZE=26214401", "552 5.3.4"),
        (b"MAIL FROM:<a@b> SIZE=99999999999999999999", "552 5.3.4"),
        (b"MAIL FROM:<a\xff@b>", "501 5.1.7"),
        (b"MAIL FROM:<a\x01@b>", "501 5.1.7"),
    ],
)
def test_mail_refused_by_the_protocol(line: bytes, code: str) -> None:
    driver = greeted()
    assert driver.feed(line + b"\r\n") == []
    assert codes_of(driver) == [code]
    driver.feed(b"MAIL FROM:<a@b>\r\n")  # no transaction was opened
    assert codes_of(driver)[-1] == "250 2.1.0"


@pytest.mark.parametrize(
    "line, code",
    [
        (b"RCPT TO:<>", "501 5.5.4"),
        (b"RCPT TO:c@d", "501 5.5.4"),
        (b"RCPT FROM:<c@d>", "501 5.5.4"),
        (b"RCPT TO:<c@d> NOTIFY=NEVER", "555 5.5.4"),
        (b"RCPT TO:<c\xc3@d>", "501 5.1.7"),
    ],
)
def test_rcpt_refused_by_the_protocol(line: bytes, code: str) -> None:
    driver = greeted()
    driver.feed(b"MAIL FROM:<a@b>\r\n" + line + b"\r\n")
    assert codes_of(driver) == ["250 2.1.0", code]
    assert [type(e) for e in driver.events] == [MailFrom]


def test_rcpt_accepted_forms() -> None:
    driver = greeted()
    driver.feed(b"MAIL FROM:<>\r\nRCPT TO: <Postmaster>\r\nRCPT TO:<\xc3\xa9@b\xc3\xbccher.example>\r\n")
    assert driver.events[1:] == [RcptTo("Postmaster", {}), RcptTo("é@bücher.example", {})]


def test_data_and_rset_take_no_argument() -> None:
    driver = greeted()
    driver.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA now\r\n")
    assert codes_of(driver)[-1] == "501 5.5.4"
    assert not driver.proto.in_data


def test_require_tls_refuses_mail_until_starttls() -> None:
    driver = greeted(Limits(require_tls=True, tls_available=True))
    driver.feed(b"MAIL FROM:<a@b>\r\n")
    assert codes_of(driver) == ["530 5.7.0"]
    assert driver.events == []
    driver.feed(b"STARTTLS\r\n")
    driver.feed(b"EHLO x\r\nMAIL FROM:<a@b>\r\n")
    assert codes_of(driver)[-1] == "250 2.1.0"


def test_starttls_discards_pipelined_commands_and_resets_state() -> None:
    driver = greeted(Limits(tls_available=True))
    driver.feed(b"STARTTLS\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert driver.events == [StartTls()]
    assert bytes(driver.out) == b"220 2.0.0 Ready to start TLS\r\n"
    assert driver.writes == 2  # the EHLO reply, then the 220 alone before the wrap
    # tls_started() was called by the driver: back to "no EHLO yet"
    driver.feed(b"MAIL FROM:<a@b>\r\nEHLO x\r\nSTARTTLS\r\nMAIL FROM:<a@b>\r\n")
    assert codes_of(driver)[1:] == ["503 5.5.1", "250", "503 5.5.1", "250 2.1.0"]


def test_events_wait_for_tls_started() -> None:
    proto = ServerProtocol(Limits(tls_available=True), DOMAIN)
    proto.receive_data(b"EHLO x\r\nSTARTTLS\r\n")
    assert [type(e) for e in proto.events()] == [Hello, StartTls]
    proto.receive_data(b"NOOP\r\n")  # cleartext before the handshake: dropped
    assert list(proto.events()) == []
    proto.tls_started()
    proto.receive_data(b"NOOP\r\n")
    list(proto.events())
    assert proto.data_to_send().endswith(b"220 2.0.0 Ready to start TLS\r\n250 2.0.0 OK\r\n")


def test_ehlo_in_a_transaction_resets_it() -> None:
    driver = greeted()
    driver.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nEHLO again\r\nRCPT TO:<c@d>\r\n")
    assert driver.events[2:] == [Reset(), Hello("again", True)]
    assert codes_of(driver)[-1] == "503 5.5.1"


def test_too_many_recipients_counts_accepted_ones() -> None:
    def backend(event: Event) -> Reply | None:
        if isinstance(event, RcptTo) and event.recipient.startswith("bad"):
            return Reply(550, "5.1.1", "No such user")
        return accept_all(event)

    driver = greeted(Limits(max_recipients=2), backend=backend)
    driver.feed(b"MAIL FROM:<a@b>\r\n" + b"".join(b"RCPT TO:<%s@d>\r\n" % n for n in (b"1", b"bad", b"2", b"3")))
    assert codes_of(driver) == ["250 2.1.0", "250 2.1.5", "550 5.1.1", "250 2.1.5", "452 4.5.3"]
    assert [e.recipient for e in driver.events if isinstance(e, RcptTo)] == ["1@d", "bad@d", "2@d"]
    driver.feed(b"DATA\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<4@d>\r\n")  # next envelope: counted afresh
    assert codes_of(driver)[-3:] == ["250 2.0.0", "250 2.1.0", "250 2.1.5"]


def test_data_without_accepted_recipient_is_answered_554() -> None:
    def backend(event: Event) -> Reply | None:
        if isinstance(event, RcptTo):
            return Reply(550, "5.1.1", "No such user")
        return accept_all(event)

    driver = greeted(backend=backend)
    driver.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert codes_of(driver) == ["250 2.1.0", "550 5.1.1", "554 5.5.1"]
    assert not any(isinstance(e, DataStart) for e in driver.events)


def test_rejected_mail_opens_no_transaction() -> None:
    def backend(event: Event) -> Reply | None:
        if isinstance(event, MailFrom):
            return replies.PRIMARY_UNAVAILABLE
        return accept_all(event)

    driver = greeted(backend=backend)
    driver.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nMAIL FROM:<a@b>\r\n")
    assert codes_of(driver) == ["451 4.4.1", "503 5.5.1", "451 4.4.1"]


def test_data_refused_by_backend_ends_the_transaction() -> None:
    def backend(event: Event) -> Reply | None:
        if isinstance(event, DataStart):
            return replies.PRIMARY_UNAVAILABLE
        return accept_all(event)

    driver = greeted(backend=backend)
    driver.feed(b"MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\nRCPT TO:<c@d>\r\n")
    assert codes_of(driver) == ["250 2.1.0", "250 2.1.5", "451 4.4.1", "503 5.5.1"]
    assert not driver.proto.in_data


def test_each_message_has_its_own_envelope() -> None:
    driver = in_data()
    driver.feed(b"body\r\n.\r\nRCPT TO:<c@d>\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\n.\r\n")
    assert codes_of(driver) == ["250 2.0.0", "503 5.5.1", "250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]


def test_pipelined_batch_is_answered_in_order_in_one_write() -> None:
    driver = Driver()
    driver.feed(
        b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@d>\r\nRCPT TO:<>\r\nNOOP\r\nBOGUS\r\n"
        b"RCPT TO:<2@d>\r\nVRFY u\r\nDATA\r\n"
    )
    assert driver.writes == 1  # the whole batch in one write
    assert driver.codes() == ["250", "250 2.1.0", "250 2.1.5", "501 5.5.4", "250 2.0.0", "500 5.5.2", "250 2.1.5", "252 2.5.0", "354"]


def test_events_stop_until_reply_is_given() -> None:
    proto = ServerProtocol(Limits(), DOMAIN)
    proto.receive_data(b"EHLO x\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\n")
    assert [type(e) for e in proto.events()] == [Hello, MailFrom]
    assert list(proto.events()) == []  # still waiting for the MAIL reply
    assert proto.reply(Reply(250, "2.1.0", "Ok")) is None
    assert [type(e) for e in proto.events()] == [RcptTo]
    proto.reply(Reply(250, "2.1.5", "Ok"))
    assert reply_codes(proto.data_to_send()) == ["250", "250 2.1.0", "250 2.1.5"]


def test_reply_without_pending_event_is_a_protocol_error() -> None:
    proto = ServerProtocol(Limits(), DOMAIN)
    with pytest.raises(ProtocolError) as info:
        proto.reply(replies.OK)
    assert info.value.reply == replies.LOCAL_ERROR
    proto.receive_data(b"EHLO x\r\n")
    list(proto.events())
    with pytest.raises(ProtocolError):
        proto.reply(replies.OK)  # Hello is answered by the protocol
    with pytest.raises(ProtocolError):
        proto.tls_started()


def test_limits_are_validated() -> None:
    with pytest.raises(ValueError):
        Limits(bare_newline="strip")


# --- Command line length ------------------------------------------------------


def test_line_of_512_octets_is_fine_513_is_too_long() -> None:
    driver = greeted()
    ok = b"NOOP " + b"x" * (512 - 7) + b"\r\n"
    long = b"NOOP " + b"x" * (512 - 6) + b"\r\n"
    assert len(ok) == 512 and len(long) == 513
    driver.feed(ok + long + b"NOOP\r\n")
    assert codes_of(driver) == ["250 2.0.0", "500 5.5.2", "250 2.0.0"]


@pytest.mark.parametrize("piece", [1, 7, 512, 4096])
def test_long_line_stays_in_sync_and_buffer_is_bounded(piece: int) -> None:
    driver = greeted()
    stream = b"MAIL FROM:<" + b"a" * 100_000 + b"@b>\r\nRCPT TO:<c@d>\r\nMAIL FROM:<a@b>\r\n"
    for i in range(0, len(stream), piece):
        driver.feed(stream[i : i + piece])
        assert driver.proto.buffered_bytes <= 512
    assert codes_of(driver) == ["500 5.5.2", "503 5.5.1", "250 2.1.0"]
    assert bytes(driver.out).count(b"Line too long") == 1


# --- DATA ---------------------------------------------------------------------


def test_empty_message() -> None:
    driver = in_data()
    assert driver.feed(b".\r\n") == [DataEnd()]
    assert codes_of(driver) == ["250 2.0.0"]
    assert not driver.proto.in_data


def test_message_of_one_empty_line() -> None:
    driver = in_data()
    assert driver.feed(b"\r\n.\r\n") == [DataChunk(b"\r\n"), DataEnd()]


def test_dot_stuffed_content_passes_unchanged_in_one_chunk() -> None:
    content = b"Subject: x\r\n\r\n..leading dot\r\n...\r\n. \r\nend\r\n"
    driver = in_data()
    assert driver.feed(content + b".\r\n") == [DataChunk(content), DataEnd()]


@pytest.mark.parametrize("sequence", [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\r", b"\r.\r\n", b"\n.\r\r\n"])
@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_lone_dot_with_bare_newline_never_ends_data(sequence: bytes, mode: str) -> None:
    driver = in_data(Limits(bare_newline=mode))
    driver.feed(b"a" + sequence + b"b\r\n")
    assert not any(isinstance(e, DataEnd) for e in driver.events)
    assert driver.proto.in_data
    driver.feed(b".\r\n")
    if mode == "normalize":
        assert driver.events[-1] == DataEnd()
        content = driver.content()
        assert b"\r\n.\r\n" not in content and b"\r\n..\r\n" in content
    else:
        assert DataAbort(replies.BARE_NEWLINE) in driver.events
        assert codes_of(driver) == ["550 5.5.2"]
    assert not driver.proto.in_data


@pytest.mark.parametrize(
    "raw, wire",
    [
        (b"a\n.\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\r\n.\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\n.\r\nb\r\n", b"a\r\n..\r\nb\r\n"),
        (b"a\n..b\r\n", b"a\r\n...b\r\n"),
        (b"..a\nb\r\n", b"..a\r\nb\r\n"),
        (b".\nb\r\n", b"..\r\nb\r\n"),
        (b"a\rb\r\n", b"a\r\nb\r\n"),
        (b"a\r\r\n", b"a\r\n\r\n"),
        (b"a\n\r\n", b"a\r\n\r\n"),
        (b"a\n\rb\r\n", b"a\r\n\r\nb\r\n"),
    ],
)
def test_bare_newlines_are_normalized(raw: bytes, wire: bytes) -> None:
    driver = in_data()
    driver.feed(raw + b".\r\n")
    assert driver.content() == wire and driver.events[-1] == DataEnd()
    for i in range(1, len(raw)):  # the same whatever the split
        driver = in_data()
        driver.feed_pieces([raw[:i], raw[i:], b".\r\n"])
        assert driver.content() == wire


# SMTP smuggling with NULs (SEC Consult's scanner, smtpsmug): a destination
# that drops NULs would read these as an end of data.
NUL_SMUGGLING = [b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\r\n\x00.\x00\r\n", b"\r\n.\x00\x00\r\n", b"\n\x00.\n"]


@pytest.mark.parametrize("sequence", NUL_SMUGGLING)
@pytest.mark.parametrize("mode", ["normalize", "reject"])
def test_nul_smuggling_never_ends_data(sequence: bytes, mode: str) -> None:
    raw = b"a" + sequence + b"MAIL FROM:<evil@example.com>\r\n"
    for i in range(len(raw) + 1):  # whatever the split
        driver = in_data(Limits(bare_newline=mode))
        driver.feed_pieces([p for p in (raw[:i], raw[i:]) if p])  # b"" would be a close
        assert driver.proto.in_data and not any(isinstance(e, (DataEnd, MailFrom)) for e in driver.events)
        driver.feed(b".\r\n")
        assert not driver.proto.in_data
        if mode == "normalize":
            assert driver.events[-1] == DataEnd()
            content = driver.content()
            assert b"\x00" not in content
            assert content == b"a\r\n..\r\nMAIL FROM:<evil@example.com>\r\n"
        else:
            # With a bare LF too, the first faulty read decides which reply.
            allowed = {replies.NUL_IN_CONTENT} | ({replies.BARE_NEWLINE} if b"\r\n" not in sequence else set())
            aborts = [e.reply for e in driver.events if isinstance(e, DataAbort)]
            assert len(aborts) == 1 and aborts[0] in allowed
            assert b"\x00" not in driver.content()
            assert codes_of(driver) == [f"550 {aborts[0].enhanced}"]


@pytest.mark.parametrize(
    "raw, wire",
    [
        (b"a\x00b\r\n", b"ab\r\n"),
        (b"\x00\r\n", b"\r\n"),
        (b"\x00.\r\n", b"..\r\n"),
        (b"\x00.x\r\n", b"..x\r\n"),
        (b".\x00\r\n", b"..\r\n"),
        (b".\x00x\r\n", b".x\r\n"),
        (b"..\x00\r\n", b"..\r\n"),
        (b"x\n\x00.\r\n", b"x\r\n..\r\n"),
        (b".\x00\nb\r\n", b"..\r\nb\r\n"),
        (b"\x00\x00\x00\r\n.\x00\x00\r\n", b"\r\n..\r\n"),
    ],
)
def test_nul_is_removed_before_dot_stuffing(raw: bytes, wire: bytes) -> None:
    for i in range(len(raw) + 1):
        for j in range(i, len(raw) + 1):
            driver = in_data()
            driver.feed_pieces([p for p in (raw[:i], raw[i:j], raw[j:], b".\r\n") if p])
            assert driver.events[-1] == DataEnd()
            assert driver.content() == wire, (i, j)
            assert all(e.data for e in driver.events if isinstance(e, DataChunk))


def test_nul_rejected_drains_to_the_dot() -> None:
    driver = in_data(Limits(bare_newline="reject"))
    driver.feed(b"good line\r\nbad\x00line\r\n")
    assert driver.events == [DataAbort(replies.NUL_IN_CONTENT)]
    driver.feed(b"more\r\n" * 100 + b".\r\nNOOP\r\n")
    assert codes_of(driver) == ["550 5.6.0", "250 2.0.0"]
    assert not any(isinstance(e, DataEnd) for e in driver.events)


def test_bare_newline_rejected_drains_to_the_dot() -> None:
    driver = in_data(Limits(bare_newline="reject"))
    driver.feed(b"good line\r\nbad\nline\r\n")
    assert driver.events == [DataAbort(replies.BARE_NEWLINE)]
    assert codes_of(driver) == []  # answered at the terminator, not before
    driver.feed(b"more\r\n" * 1000)
    assert driver.events == [DataAbort(replies.BARE_NEWLINE)]
    assert driver.proto.buffered_bytes <= DATA_HOLD_BYTES
    driver.feed(b".\r\nRCPT TO:<c@d>\r\n")
    assert codes_of(driver) == ["550 5.5.2", "503 5.5.1"]


def test_bare_cr_at_the_end_of_a_read_is_caught_in_reject_mode() -> None:
    driver = in_data(Limits(bare_newline="reject"))
    driver.feed(b"line\r")
    assert driver.events == [DataChunk(b"line")]
    driver.feed(b"x\r\n.\r\n")
    assert driver.events[1:] == [DataAbort(replies.BARE_NEWLINE)]
    assert codes_of(driver) == ["550 5.5.2"]


def test_size_counts_content_as_sent() -> None:
    content = b"a\nb\r\n" + b"x" * 93 + b"\r\n"  # 100 bytes, bare LF counted once
    driver = in_data(Limits(max_message_bytes=100))
    driver.feed(content + b".\r\n")
    assert driver.events[-1] == DataEnd()
    driver = in_data(Limits(max_message_bytes=99))
    driver.feed(content + b".\r\n")
    assert DataAbort(replies.MESSAGE_TOO_BIG) in driver.events
    assert codes_of(driver) == ["552 5.3.4"]


def test_too_big_aborts_without_holding_data() -> None:
    driver = in_data(Limits(max_message_bytes=100_000))
    piece = (b"y" * 1000 + b"\r\n") * 64
    for _ in range(100):  # 6.4 MB
        driver.feed(piece)
        assert driver.proto.buffered_bytes <= DATA_HOLD_BYTES
    aborts = [i for i, e in enumerate(driver.events) if isinstance(e, DataAbort)]
    assert aborts and driver.events[aborts[0]] == DataAbort(replies.MESSAGE_TOO_BIG)
    assert len(driver.events) == aborts[0] + 1  # nothing after the abort
    assert len(driver.content()) <= 100_000
    assert codes_of(driver) == []
    driver.feed(b".\r\nNOOP\r\n")
    assert codes_of(driver) == ["552 5.3.4", "250 2.0.0"]
    assert not any(isinstance(e, DataEnd) for e in driver.events)


@pytest.mark.parametrize("piece", [1, 3, 65536])
def test_huge_line_streams_with_bounded_buffer(piece: int) -> None:
    driver = in_data()
    total = 0
    data = b"z" * 65536
    for _ in range(2 if piece < 100 else 50):
        for i in range(0, len(data), piece):
            driver.feed(data[i : i + piece])
            assert driver.proto.buffered_bytes <= DATA_HOLD_BYTES
        total += len(data)
        assert len(driver.content()) == total  # passed on, not held
    driver.feed(b"\r\n.\r\n")
    assert driver.events[-1] == DataEnd()


def test_terminator_split_across_reads() -> None:
    for i in range(1, 5):
        driver = in_data()
        driver.feed(b"abc" + b"\r\n.\r\n"[:i])
        assert not any(isinstance(e, DataEnd) for e in driver.events)
        driver.feed(b"\r\n.\r\n"[i:] + b"NOOP\r\n")
        assert driver.content() == b"abc\r\n"
        assert codes_of(driver) == ["250 2.0.0", "250 2.0.0"]


def test_disconnect_mid_data() -> None:
    driver = in_data()
    driver.feed(b"some content\r\n")
    driver.feed(b"")
    assert driver.events[-1] == ConnectionClosed()
    assert not any(isinstance(e, DataEnd) for e in driver.events)
    assert driver.proto.closed


def test_pipelined_commands_after_the_dot() -> None:
    driver = in_data()
    driver.feed(b"body\r\n.\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    assert [type(e) for e in driver.events] == [DataChunk, DataEnd, MailFrom, RcptTo, DataStart]
    assert driver.proto.in_data


# --- Properties ---------------------------------------------------------------


def canonical(events: list[Event]) -> list[Event]:
    """Events with chunking erased: consecutive DataChunks merged, and
    chunks before a DataAbort dropped (the backend drops them anyway, and
    how many were passed on before a limit struck depends on the reads)."""
    out: list[Event] = []
    for event in events:
        if isinstance(event, DataChunk) and out and isinstance(out[-1], DataChunk):
            out[-1] = DataChunk(out[-1].data + event.data)
        elif isinstance(event, DataAbort) and out and isinstance(out[-1], DataChunk):
            out[-1] = event
        else:
            out.append(event)
    return out


def run(limits: Limits, pieces: list[bytes], close: bool = True) -> tuple[list[Event], bytes]:
    driver = Driver(limits)
    driver.feed_pieces(pieces)
    if close:
        driver.feed(b"")
    return driver.events, bytes(driver.out)


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


# Pieces of a session: commands (good and bad) and content with dots, bare
# CR/LF and terminators in every arrangement.
TOKENS = [
    b"\r\n", b"\r", b"\n", b".", b"\r\n.\r\n", b".\r\n", b"x", b"..", b" ", b"\xff", b"\xc3\xa9",
    b"EHLO x\r\n", b"HELO x\r\n", b"MAIL FROM:<a@b>\r\n", b"MAIL FROM:<> SIZE=9\r\n",
    b"RCPT TO:<c@d>\r\n", b"DATA\r\n", b"RSET\r\n", b"NOOP\r\n", b"VRFY x\r\n", b"STARTTLS\r\n",
    b"BOGUS\r\n", b"QUIT\r\n", b"a" * 40,
]
streams = st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join)
limits_variants = st.sampled_from(
    [
        Limits(),
        Limits(bare_newline="reject"),
        Limits(max_message_bytes=20, max_line_bytes=24, max_recipients=1),
        Limits(max_message_bytes=0, bare_newline="reject", max_line_bytes=16),
    ]
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(limits=limits_variants, body=streams, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_any_split_gives_the_same_events_and_replies(limits: Limits, body: bytes, cuts: list[int]) -> None:
    stream = ENVELOPE + body
    whole_events, whole_out = run(limits, [stream])
    events, out = run(limits, split(stream, cuts))
    assert canonical(events) == canonical(whole_events)
    assert out == whole_out
    events, out = run(limits, [stream[i : i + 1] for i in range(len(stream))])
    assert canonical(events) == canonical(whole_events)
    assert out == whole_out


def random_backend(draw: Callable) -> Callable[[Event], Reply | None]:
    choices = {
        MailFrom: [Reply(250, "2.1.0", "Ok"), replies.PRIMARY_UNAVAILABLE, Reply(553, "5.6.7", "no")],
        RcptTo: [Reply(250, "2.1.5", "Ok"), Reply(550, "5.1.1", "no"), Reply(451, "4.4.1", "later")],
        DataStart: [replies.START_DATA, Reply(554, "5.5.1", "no")],
        DataEnd: [QUEUED, Reply(554, "5.7.1", "spam"), Reply(451, "", "x\ny")],
    }

    def backend(event: Event) -> Reply | None:
        options = choices.get(type(event))
        return draw(st.sampled_from(options)) if options else None

    return backend


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    limits=st.sampled_from([Limits(tls_available=True), Limits(bare_newline="reject", max_line_bytes=16, max_message_bytes=10)]),
    prefix=st.sampled_from([b"", ENVELOPE]),
    garbage=st.binary(max_size=400) | streams,
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_arbitrary_bytes_only_ever_yield_events(data, limits, prefix, garbage, cuts) -> None:
    driver = Driver(limits, backend=random_backend(data.draw))
    driver.feed_pieces(split(prefix + garbage, cuts))
    driver.feed(b"")
    assert driver.events[-1] == ConnectionClosed() or isinstance(driver.events[-1], Quit)
    assert driver.proto.closed
    assert driver.out.endswith(b"\r\n")
    assert driver.out.count(b"\r") == driver.out.count(b"\n") == driver.out.count(b"\r\n")
    assert not any(b"\x00" in e.data for e in driver.events if isinstance(e, DataChunk))


# Lines of a session, one read each; in state DATA every line but "." is
# content.
MODEL_LINES = [
    b"EHLO x", b"HELO x", b"EHLO", b"MAIL FROM:<a@b>", b"RCPT TO:<c@d>", b"DATA", b"DATA x", b"RSET",
    b"NOOP", b"VRFY u", b"HELP", b"STARTTLS", b"QUIT", b"BOGUS", b".", b"body",
]


def model_step(state: State, recipients: int, tls: bool, line: bytes, accept: bool) -> tuple[State, int, bool, bool]:
    """The sequence rules the slow, obvious way: (state, accepted recipients,
    TLS active) after `line`, and whether it is answered 503 5.5.1 Bad
    sequence. `accept`: whether the backend accepts what it is asked."""
    if state is State.CLOSED:
        return state, recipients, tls, False
    if state is State.DATA:
        return (State.GREETED, 0, tls, False) if line == b"." else (state, recipients, tls, False)
    verb, _, arg = line.partition(b" ")
    name = verb.decode()
    if name not in VERB_LINES:
        return state, recipients, tls, False  # 500
    if name not in ACCEPTED_VERBS[state]:
        return state, recipients, tls, True
    if name in ("EHLO", "HELO") and arg:
        return State.GREETED, 0, tls, False
    if name == "MAIL" and accept:
        return State.TRANSACTION, 0, tls, False
    if name == "RCPT" and accept:
        return state, recipients + 1, tls, False
    if name == "DATA" and not arg and recipients:
        return (State.DATA, recipients, tls, False) if accept else (State.GREETED, 0, tls, False)
    if name == "RSET":
        return State.GREETED if state is State.TRANSACTION else state, 0, tls, False
    if name == "QUIT":
        return State.CLOSED, 0, tls, False
    if name == "STARTTLS" and not tls:
        return State.START, 0, True, False
    return state, recipients, tls, False


@settings(max_examples=300)
@given(steps=st.lists(st.tuples(st.sampled_from(MODEL_LINES), st.booleans()), max_size=40))
def test_state_follows_a_model_of_the_sequence_rules(steps: list[tuple[bytes, bool]]) -> None:
    accept = True

    def backend(event: Event) -> Reply | None:
        answer = accept_all(event)
        return answer if answer is None or accept else Reply(554, "5.7.1", "no")

    driver = Driver(Limits(tls_available=True), backend=backend)
    state, recipients, tls = State.START, 0, False
    for line, accept in steps:
        driver.out.clear()
        driver.feed(line + b"\r\n")
        state, recipients, tls, bad_sequence = model_step(state, recipients, tls, line, accept)
        assert driver.proto.state is state, (line, accept)
        assert driver.proto.in_transaction is (state in (State.TRANSACTION, State.DATA))
        assert driver.proto.in_data is (state is State.DATA)
        assert (bytes(driver.out) == replies.BAD_SEQUENCE.to_bytes()) is bad_sequence, (line, driver.out)
    driver.feed(b"")
    assert driver.proto.state is State.CLOSED


def reference_content(raw: bytes) -> bytes:
    """What smtpdup should send for `raw` (bytes after the 354), line by line
    in Python: SPEC 3's rules written the slow, obvious way."""
    stream = b"\r\n" + raw
    end = stream.find(b"\r\n.\r\n")
    assert end >= 0
    content = stream[2 : end + 2]
    lines: list[bytes] = []
    for wire_line in content.split(b"\r\n")[:-1]:
        raw_first, *later = re.split(rb"\r|\n", wire_line)
        first = raw_first.replace(b"\x00", b"")
        if raw_first.startswith(b"."):  # the client dot-stuffed it
            lines.append(b".." if first == b"." else first)
        else:  # NULs removed before the line is dot-stuffed
            lines.append(b"." + first if first.startswith(b".") else first)
        later = [s.replace(b"\x00", b"") for s in later]
        lines += [b"." + s if s.startswith(b".") else s for s in later]
    return b"".join(line + b"\r\n" for line in lines)


def ends_only_at_the_end(content: bytes) -> bool:
    """Whether a lenient destination (one that drops NULs and takes a bare
    CR or LF for a line end) reads the end of data in ``content + b".\\r\\n"``
    sent after a 354 only at that final dot."""
    relaxed = (b"\n" + content + b".\r\n").replace(b"\x00", b"").replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    return relaxed.find(b"\n.\n") == len(relaxed) - 3


CONTENT_TOKENS = [b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n.", b".\r\n", b"\n.\n", b"\r\n.\r\n"]
NUL_TOKENS = [b"\x00", b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"\x00.", b".\x00", b"\n\x00.\n", b"\x00\x00"]
content_streams = st.lists(st.sampled_from(CONTENT_TOKENS), max_size=40).map(b"".join)
nul_content_streams = st.lists(st.sampled_from(CONTENT_TOKENS + NUL_TOKENS), max_size=40).map(b"".join)


@settings(max_examples=800)
@given(raw=content_streams | nul_content_streams, cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_forwarded_content_is_safe_and_matches_the_reference(raw: bytes, cuts: list[int]) -> None:
    raw += b"\r\n.\r\n"  # make sure DATA ends somewhere
    expected = reference_content(raw)
    for pieces in (split(raw, cuts), [raw[i : i + 1] for i in range(len(raw))]):
        driver = in_data()
        driver.feed_pieces(pieces)
        message = []
        for event in driver.events:
            if isinstance(event, DataEnd):
                break
            assert isinstance(event, DataChunk) and event.data
            message.append(event.data)
        else:
            pytest.fail("no DataEnd")
        content = b"".join(message)
        assert content == expected
        assert b"\r\n.\r\n" not in content
        assert not content.startswith(b".\r\n")
        assert b"\x00" not in content
        assert ends_only_at_the_end(content)  # even for a lenient reader
        assert content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")
        assert content == b"" or content.endswith(b"\r\n")


@settings(max_examples=500)
@given(raw=nul_content_streams, cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_reject_mode_refuses_any_content_with_nul_or_bare_newline(raw: bytes, cuts: list[int]) -> None:
    end = (b"\r\n" + raw + b"\r\n.\r\n").find(b"\r\n.\r\n")
    stream = (raw + b"\r\n.\r\n")[: end + 3]  # up to the first real end
    content = stream[:-3]
    well_formed = b"\x00" not in content and content.count(b"\r") == content.count(b"\n") == content.count(b"\r\n")
    driver = in_data(Limits(bare_newline="reject"))
    driver.feed_pieces(split(stream, cuts))
    chunks = [e.data for e in driver.events if isinstance(e, DataChunk)]
    assert all(b"\x00" not in chunk for chunk in chunks)
    if well_formed:
        assert driver.events[-1] == DataEnd() and driver.content() == content
    else:
        aborts = [e for e in driver.events if isinstance(e, DataAbort)]
        assert len(aborts) == 1 and not any(isinstance(e, DataEnd) for e in driver.events)
        bare = content.replace(b"\x00", b"").count(b"\r") != content.count(b"\r\n") or (
            content.count(b"\n") != content.count(b"\r\n")
        )
        if b"\x00" not in content:
            assert aborts[0].reply == replies.BARE_NEWLINE
        elif not bare:
            assert aborts[0].reply == replies.NUL_IN_CONTENT
        else:  # both faults: the first read that holds one decides
            assert aborts[0].reply in (replies.NUL_IN_CONTENT, replies.BARE_NEWLINE)
        assert codes_of(driver) == [f"550 {aborts[0].reply.enhanced}"]


SMUGGLING_TOKENS = [
    b"x", b".", b"\r\n", b"\n", b"\r", b"\x00", b"\n.\n", b"\r.\r", b"\r\n.\n", b"\n.\r\n",
    b"\r\n\x00.\r\n", b"\r\n.\x00\r\n", b"MAIL FROM:<evil@example.com>\r\n",
    b"RCPT TO:<victim@example.net>\r\n", b"DATA\r\n", b"QUIT\r\n",
]


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(
    body=st.lists(st.sampled_from(SMUGGLING_TOKENS), max_size=30).map(b"".join),
    mode=st.sampled_from(["normalize", "reject"]),
    cuts=st.lists(st.integers(min_value=0), max_size=10),
)
def test_end_of_data_only_at_the_real_end(body: bytes, mode: str, cuts: list[int]) -> None:
    """Whatever fake ends the content holds, the message ends at the first
    CRLF.CRLF and only there; the one MAIL after it is the only one seen."""
    assume(b"\r\n.\r\n" not in b"\r\n" + body + b"\r\n")
    stream = body + b"\r\n.\r\nMAIL FROM:<next@example.org>\r\n"
    driver = in_data(Limits(bare_newline=mode))
    driver.feed_pieces(split(stream, cuts))
    ends = [i for i, e in enumerate(driver.events) if isinstance(e, (DataEnd, DataAbort))]
    mails = [e for e in driver.events if isinstance(e, MailFrom)]
    assert len(ends) == 1 and mails == [MailFrom("next@example.org", {})]
    assert driver.events[-1] == mails[0]
    content = driver.content()
    assert b"\x00" not in content
    if mode == "normalize":
        assert driver.events[ends[0]] == DataEnd()
        assert ends_only_at_the_end(content) and content.endswith(b"\r\n")


def dot_stuff(lines: list[bytes]) -> bytes:
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


def dot_unstuff(content: bytes) -> list[bytes]:
    return [line[1:] if line.startswith(b".") else line for line in content.split(b"\r\n")[:-1]]


lines_strategy = st.lists(
    st.lists(st.sampled_from([b".", b"x", b" ", b"\xff", b"\t", b"\x01"]), max_size=6).map(b"".join), max_size=20
)


@settings(max_examples=300)
@given(lines=lines_strategy, cuts=st.lists(st.integers(min_value=0), max_size=10))
def test_well_formed_content_passes_byte_for_byte_and_round_trips(lines: list[bytes], cuts: list[int]) -> None:
    wire = dot_stuff(lines)
    stream = wire + b".\r\n"
    for limits in (Limits(), Limits(bare_newline="reject")):
        for pieces in (split(stream, cuts), [stream[i : i + 1] for i in range(len(stream))]):
            driver = in_data(limits)
            driver.feed_pieces(pieces)
            assert driver.events[-1] == DataEnd()
            assert driver.content() == wire
            assert dot_unstuff(driver.content()) == lines
