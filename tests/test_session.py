"""Tests for the gevent shell (smtpdup.session) while the server drains,
and for the sweeper that ends sessions whose client keeps them waiting.

A session in a transaction may finish it; one without is told 421 4.3.2
and closed. The session asks the protocol whether a transaction is open
(``ServerProtocol.in_transaction``), so each protocol state is driven here
over a real loopback connection to an in-process server with the sink's
backend.
"""

from __future__ import annotations

import socket

import gevent
import pytest

from conftest import WAIT_TIMEOUT, relay_environ, wait_until
from smtpdup import config as config_module
from smtpdup.server import SmtpServer
from smtpdup.sink import Maildir, SinkSession

ENVELOPE = b"EHLO client.example\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.net>\r\n"
SHUTTING_DOWN = b"421 4.3.2 "
# How long a client that must not be told anything waits to hear nothing.
QUIET_SECONDS = 0.3


class Sink:
    """An in-process sink server on a free loopback port (message limit 100
    bytes), and the drain started on it, if any."""

    def __init__(self, tmp_path, **keys) -> None:
        environ = relay_environ(tmp_path, "127.0.0.1:25", smtp_max_message_bytes=100, **keys)
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        maildir = Maildir(str(tmp_path / "mail"))
        config = config_module.Current(config_module.load(None, environ))
        self.server = SmtpServer(config, lambda ip: SinkSession(maildir, ip), listener=self.listener)
        self.server.start()
        self.address = self.server.address
        self.drain: gevent.Greenlet | None = None

    def start_drain(self) -> None:
        """Start a drain with a long grace; return once it has marked every
        session (and so has decided which ones are idle)."""
        self.drain = gevent.spawn(self.server.drain, 30)
        wait_until(lambda: all(s.draining for s in self.server.sessions), what="every session marked draining")

    def stop(self) -> None:
        if self.drain is None:
            self.server.drain(0)
        else:
            self.drain.join(timeout=WAIT_TIMEOUT)
            assert self.drain.ready(), "the drain did not end"
        self.listener.close()


@pytest.fixture
def sink(tmp_path):
    sink = Sink(tmp_path)
    try:
        yield sink
    finally:
        sink.stop()


def connect(sink: Sink) -> socket.socket:
    sock = socket.create_connection(sink.address, timeout=WAIT_TIMEOUT)
    assert read_reply(sock).startswith(b"220 ")
    return sock


def read_reply(sock: socket.socket) -> bytes:
    """The final line of the next reply (a byte at a time: nothing of the
    reply after it is consumed)."""
    line = b""
    while True:
        byte = sock.recv(1)
        assert byte, f"connection closed after {line!r}"
        line += byte
        if line.endswith(b"\r\n"):
            if line[3:4] == b" ":
                return line
            line = b""


def replies(sock: socket.socket, count: int) -> list[bytes]:
    return [read_reply(sock)[:9] for _ in range(count)]


def hears_nothing(sock: socket.socket) -> bool:
    sock.settimeout(QUIET_SECONDS)
    try:
        data = sock.recv(100)
    except socket.timeout:
        return True
    finally:
        sock.settimeout(WAIT_TIMEOUT)
    raise AssertionError(f"told {data!r}")


# (what the client sends before the drain, replies to read, what it sends
# after: the rest of its transaction, ending with a final dot).
IN_TRANSACTION = [
    pytest.param(ENVELOPE, 3, b"DATA\r\nSubject: x\r\n\r\nbody\r\n.\r\n", [b"354", b"250 2.0.0"], id="after-rcpt"),
    pytest.param(ENVELOPE + b"DATA\r\n", 4, b"body\r\n.\r\n", [b"250 2.0.0"], id="in-data"),
    pytest.param(ENVELOPE + b"DATA\r\nSubject: x\r\n", 4, b"\r\nbody\r\n.\r\n", [b"250 2.0.0"], id="mid-content"),
    pytest.param(ENVELOPE + b"DATA\r\n" + b"x" * 200 + b"\r\n", 4, b".\r\n", [b"552 5.3.4"], id="draining-a-refused-message"),
]


@pytest.mark.parametrize("before, count, rest, final", IN_TRANSACTION)
def test_a_transaction_in_flight_finishes_then_hears_421(sink, before, count, rest, final) -> None:
    with connect(sink) as busy, connect(sink) as idle:
        busy.sendall(before)
        replies(busy, count)
        idle.sendall(b"EHLO idle.example\r\n")
        assert read_reply(idle).startswith(b"250 ")
        sink.start_drain()
        assert read_reply(idle).startswith(SHUTTING_DOWN)
        assert idle.recv(100) == b""
        assert hears_nothing(busy)
        busy.sendall(rest)
        assert [r[: len(f)] for r, f in zip(replies(busy, len(final)), final)] == final
        assert read_reply(busy).startswith(SHUTTING_DOWN)
        assert busy.recv(100) == b""


@pytest.mark.parametrize(
    "before, count",
    [
        pytest.param(b"", 0, id="connected"),
        pytest.param(b"EHLO client.example\r\n", 1, id="greeted"),
        pytest.param(ENVELOPE + b"RSET\r\n", 4, id="after-rset"),
        pytest.param(ENVELOPE + b"DATA\r\nbody\r\n.\r\n", 5, id="after-a-message"),
        pytest.param(b"EHLO client.example\r\nMAIL FROM:<a@example.org> SIZE=1000\r\n", 2, id="mail-refused"),
    ],
)
def test_a_session_without_a_transaction_hears_421_at_once(sink, before, count) -> None:
    with connect(sink) as sock:
        if before:
            sock.sendall(before)
            replies(sock, count)
        sink.start_drain()
        assert read_reply(sock).startswith(SHUTTING_DOWN)
        assert sock.recv(100) == b""


# --- clients that keep a session waiting ----------------------------------------------

IDLE_TIMEOUT = 0.4
TIMED_OUT = b"421 4.4.2 "


@pytest.fixture
def impatient_sink(tmp_path):
    sink = Sink(tmp_path, smtp_idle_timeout_seconds=IDLE_TIMEOUT)
    try:
        yield sink
    finally:
        sink.stop()


@pytest.mark.parametrize(
    "before, count",
    [
        pytest.param(b"", 0, id="connected"),
        pytest.param(ENVELOPE, 3, id="after-rcpt"),
        pytest.param(ENVELOPE + b"DATA\r\nSubject: x\r\n", 4, id="mid-content"),
    ],
)
def test_a_silent_client_hears_421_and_is_closed(impatient_sink, before, count) -> None:
    with connect(impatient_sink) as sock:
        if before:
            sock.sendall(before)
            replies(sock, count)
        assert read_reply(sock).startswith(TIMED_OUT)
        assert sock.recv(100) == b""
    wait_until(lambda: not impatient_sink.server.sessions, what="the session to end")


def test_a_client_that_reads_no_replies_is_cut(impatient_sink) -> None:
    """It pipelines commands and never reads: once the replies fill both
    socket buffers the session's write waits, and the sweeper ends it."""
    sock = connect(impatient_sink)
    noops = b"NOOP\r\n" * 100_000

    def flood() -> None:
        try:
            for _ in range(200):  # bounded: 120 MB at most, far beyond any socket buffer
                sock.sendall(noops)
        except OSError:
            pass  # the relay closed the connection

    sender = gevent.spawn(flood)
    try:
        wait_until(lambda: impatient_sink.server.sessions and all(
            s.deadline > 0 for s in impatient_sink.server.sessions), what="the session waiting on its client")
        wait_until(lambda: not impatient_sink.server.sessions, what="the session to be cut")
    finally:
        sender.kill()
        sock.close()


def test_a_waiting_session_keeps_no_timer(impatient_sink) -> None:
    """The deadline is the only clock a waiting session holds: its socket
    has no timeout (a timer per read would cost every idle connection a
    Timeout and a watcher)."""
    with connect(impatient_sink) as sock:
        sock.sendall(b"EHLO client.example\r\n")
        replies(sock, 1)
        [session] = list(impatient_sink.server.sessions)
        assert session.sock.timeout is None
        assert session.deadline > 0
        assert read_reply(sock).startswith(TIMED_OUT)
